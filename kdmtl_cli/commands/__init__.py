"""One Hydra main per subcommand."""
