"""What every stage shares: errors, configs and the flags made from them, row selection, console
output, signals, atomic files, hashing, statistics and URLs. Imports no stage."""
