
#compdef neonctl

_neonctl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _NEONCTL_COMPLETE=complete_zsh neonctl)
}

compdef _neonctl_completion neonctl

