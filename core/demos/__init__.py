"""Built-in demo data sets (MRI phantom, cartoon faces), made without any download."""
