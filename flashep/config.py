"""`Config` (tuning knobs of the normal kernels) and DeepEP's default configs per rank count."""
from __future__ import annotations

INT32_MAX = 2**31 - 1


class Config:
    """Performance config of the normal (throughput) kernels, DeepEP V1 compatible.

    flashep sizes its buffers for the worst case instead of ring queues, so the chunk sizes are only
    validated and kept for size hints; `num_sms` bounds the SMs the normal kernels occupy and fixes the
    number of channels (`num_sms // 2`) that handles are tied to.
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        args = dict(num_sms=num_sms, num_max_nvl_chunked_send_tokens=num_max_nvl_chunked_send_tokens,
                    num_max_nvl_chunked_recv_tokens=num_max_nvl_chunked_recv_tokens,
                    num_max_rdma_chunked_send_tokens=num_max_rdma_chunked_send_tokens,
                    num_max_rdma_chunked_recv_tokens=num_max_rdma_chunked_recv_tokens)
        for name, value in args.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Config: {name} must be an int, got {type(value).__name__}")
        if num_sms < 0:
            raise ValueError(f"Config: num_sms must be >= 0, got {num_sms}")
        nvl_send, nvl_recv = num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens
        if not 0 < nvl_send < nvl_recv:
            raise ValueError("Config: need 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, "
                             f"got {nvl_send} and {nvl_recv}")
        rdma_send, rdma_recv = num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens
        if rdma_send <= 0 or rdma_recv <= 0:
            raise ValueError("Config: the RDMA chunk sizes must be > 0")
        rdma_recv = -(-rdma_recv // rdma_send) * rdma_send  # rounded up to a multiple of the send chunk
        if not (rdma_send < rdma_recv and rdma_send <= rdma_recv // 2):
            raise ValueError("Config: need num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens / 2, "
                             f"got {rdma_send} and {rdma_recv}")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = nvl_send
        self.num_max_nvl_chunked_recv_tokens = nvl_recv
        self.num_max_rdma_chunked_send_tokens = rdma_send
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    @property
    def num_channels(self) -> int:
        if self.num_sms % 2 != 0 or self.num_sms == 0:
            raise ValueError(f"Config: num_sms must be even and > 0 for the normal kernels, got {self.num_sms}")
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """DeepEP's NVLink buffer size formula (bytes), kept so that DeepEP-style sizing code runs unchanged."""
        if not (num_ranks < 8 or num_ranks % 8 == 0):
            raise ValueError(f"num_ranks must be < 8 or a multiple of 8, got {num_ranks}")
        if num_ranks > 8 and self.num_sms % 2 != 0:
            raise ValueError("num_sms must be even when num_ranks > 8")
        nvl_ranks, rdma_ranks = min(num_ranks, 8), max(num_ranks // 8, 1)
        channels, queue = self.num_sms // 2, self.num_max_nvl_chunked_recv_tokens
        size = channels * nvl_ranks * (2 * rdma_ranks + 3) * 4
        size += channels * nvl_ranks * queue * (hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4)
        return -(-size // 128) * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """DeepEP's RDMA buffer size formula (bytes); 0 inside one node."""
        if num_ranks <= 8:
            return 0
        channels, rdma_ranks = self.num_sms // 2, num_ranks // 8
        queue = self.num_max_rdma_chunked_recv_tokens
        size = channels * rdma_ranks * (8 * 2 + 2) * 2 * 4
        size += 2 * channels * rdma_ranks * queue * (hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4 + 16)
        return -(-size // 128) * 128

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, nvl=({self.num_max_nvl_chunked_send_tokens}, "
                f"{self.num_max_nvl_chunked_recv_tokens}), rdma=({self.num_max_rdma_chunked_send_tokens}, "
                f"{self.num_max_rdma_chunked_recv_tokens}))")


# (nvl_send, nvl_recv, rdma_send, rdma_recv) per rank count, DeepEP V1's defaults (tuned on H800).
_DISPATCH_DEFAULTS = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_DEFAULTS = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _nearest_row(table: dict, num_ranks: int) -> tuple:
    # flashep supports rank counts DeepEP has no row for (3, 5, 6, ...): take the next larger row.
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    for key in sorted(table):
        if key >= num_ranks:
            return table[key]
    return table[max(table)]


def default_dispatch_config(num_ranks: int, num_sms: int) -> Config:
    return Config(num_sms, *_nearest_row(_DISPATCH_DEFAULTS, num_ranks))


def default_combine_config(num_ranks: int, num_sms: int) -> Config:
    return Config(num_sms, *_nearest_row(_COMBINE_DEFAULTS, num_ranks))
