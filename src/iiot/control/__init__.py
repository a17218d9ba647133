"""Device control: commands (RPC) with tracked delivery, device attributes, the inbox."""
