"""The model: the EnCodec-style codec (`codec`: SEANet, LSTM, weight norm around a quantizer), its losses (`losses`),
the MS-STFT discriminator (`discriminator`) and the metrics (`metrics`: SI-SDR, mel distance, ViSQOL, code usage)."""
