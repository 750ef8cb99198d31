"""Getting the trained model out of the federation: files now, HTTP serving later."""
