"""Reference implementations that the compiler is tested against; they share no code with it."""
