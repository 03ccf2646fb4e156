"""What the tests, the benchmarks and the CLI's generation demo run the loop on: a tiny NNX decoder
(`tiny_decoder`), built here, never downloaded."""
