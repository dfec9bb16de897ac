"""zebra's tests. A package so that the helpers several test directories share import as `tests.helpers`."""
