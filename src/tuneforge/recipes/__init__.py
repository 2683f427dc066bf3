"""One function per user job (train, cross-validate, compare, export, ...) that reads the whole
config and wires the components; below this package, everything takes plain arguments."""
