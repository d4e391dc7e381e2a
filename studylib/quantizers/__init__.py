"""The quantizers: what they share (`base`), EnCodec's EMA codebook with every expiry mode (`ema`), the arithmetic that
keeps `upstream` bit-identical to encodec (`exact`), DAC's factorized codes (`factorized`), the vector-quantize-pytorch
peers (`peer`) and the drop-in fix for EnCodec / AudioCraft models (`patch`)."""
