"""Alarms: threshold and inactivity rules, one open alarm per (device, type), notifications."""
