"""Helpers shared by several test directories: tiny models (`models`), scripts outside the package
loaded by file path (`scripts`), subprocesses that print when they are ready (`processes`)."""
