"""The `sdc` command line: thin click commands over the library functions of the same names."""
