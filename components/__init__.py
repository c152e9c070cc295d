"""KFP v2 lightweight components, one folder per stage. Each body only calls gdrt_core."""
