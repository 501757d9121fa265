"""ar2dlm's own use of exported models: loading them with the installed runtime classes, decoding in a mode named
on the command line, and the `ar2dlm generate` stage."""
