"""Data for tokscale: image folders -> webdataset shards (shards), where shards live (locations), reading and
errors (samples), crops (transforms), per-worker sharding (sampling), the training and evaluation streams
(stream), token shards for the AR trainers (tokens), the embedded default dataset (embedded). See README.md."""
