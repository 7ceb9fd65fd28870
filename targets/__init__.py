"""Device targets: TVM targets, compilers, power and roofline profiles (see DESIGN.md)."""
