"""Run open_clip's own trainer (`open_clip_train.main`) as the peer of `bench_train.py`.

    python benchmarks/open_clip_peer.py [open_clip_train flags]

Two adjustments, both outside open_clip's training code, so the peer trains exactly as open_clip
does: dissect_fast's small model configs (micro-vit, tiny-vit) are registered by name, and with
webdataset >= 1.0 the `tar_file_expander` that open_clip_train.data imported is replaced by
webdataset's own with ``eof_value=None`` (the 1.x default appends an end-of-file marker sample
that open_clip's `group_by_keys_nothrow` does not expect). The same expander keeps only the fields
open_clip reads (image and caption): webdataset's default decoders would try to parse our binary
`id` field as a decimal integer and drop every sample.
"""

from __future__ import annotations

import functools
import os
import sys

_FIELDS = {"jpg", "jpeg", "png", "webp", "txt"}


def _open_clip_field(fname: str) -> bool:
    return fname.rsplit(".", 1)[-1].lower() in _FIELDS


def main(argv: list[str]) -> None:
    import open_clip
    import open_clip_train.data as oc_data
    import webdataset
    from webdataset import tariterators

    open_clip.add_model_config(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dissect_fast", "model_configs")
    )
    kw = {"eof_value": None} if int(webdataset.__version__.split(".")[0]) >= 1 else {}
    oc_data.tar_file_expander = functools.partial(tariterators.tar_file_expander, select_files=_open_clip_field, **kw)
    from open_clip_train.main import main as oc_main

    oc_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
