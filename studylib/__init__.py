"""EnCodec dead-code expiry study."""
