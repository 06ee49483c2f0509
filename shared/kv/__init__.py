"""The KV store: block names (keys), quantization (quant), the stored block format (block),
the worker's direct Redis client (store), the metadata client of the kvstore service (client), and
the decode shards persisted for restore (shards)."""

from shared.kv.client import KVIndexClient
from shared.kv.keys import BlockRef, KVBlockKey, block_chain
from shared.kv.messages import KVStats
from shared.kv.quant import QUANT_MODES, QuantizedKV, dequantize_kv, quantize_kv
from shared.kv.shards import Shard, ShardStore
from shared.kv.store import KVBlockStore

__all__ = [
    "QUANT_MODES",
    "BlockRef",
    "KVBlockKey",
    "KVBlockStore",
    "KVIndexClient",
    "KVStats",
    "QuantizedKV",
    "Shard",
    "ShardStore",
    "block_chain",
    "dequantize_kv",
    "quantize_kv",
]
