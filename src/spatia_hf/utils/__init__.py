"""Small package-wide helpers that import nothing heavy: Auto-class registration and progress bars."""
