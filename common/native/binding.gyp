{
  "targets": [
    {
      "target_name": "pairgate_relay",
      "sources": ["relay.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-std=gnu11"],
      "conditions": [["OS!='linux'", {"type": "none"}]]
    }
  ]
}
