-- A user's access tokens carry the version current when they were issued; a password or
-- role change bumps it, so every token issued before stops working at once.
ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0;
