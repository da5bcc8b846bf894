"""The published DELG SavedModels and the official extraction recipe.

Values come from tensorflow/models ``research/delf``: the download links from the DELF README
("DELG pre-trained on the Google-Landmarks dataset v1 / v2 (clean)") and the extraction settings
from ``research/delf/delf/python/delg/{r50,r101}delg_{gld,gldv2clean}_config.pbtxt``:
``use_local_features: true``, ``use_global_features: true``, seven ``image_scales``,
``delf_local_config { max_feature_num: 1000 score_threshold: ... }``,
``delf_global_config { image_scales_ind: 3 4 5 }`` and ``max_image_size: 1024``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Image pyramid of the official DELG configs (``image_scales``; 2^(-2) ... 2^1 in half octaves).
IMAGE_SCALES: tuple[float, ...] = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
#: Indices into :data:`IMAGE_SCALES` used for the global descriptor (scales 0.7071, 1, 1.4142).
GLOBAL_SCALE_IDS: tuple[int, ...] = (3, 4, 5)
#: At most this many local features per image (``delf_local_config.max_feature_num``).
MAX_FEATURE_NUM = 1000
#: Images are downsized so their longest side is at most this (``max_image_size``).
MAX_IMAGE_SIZE = 1024

_BASE_URL = "https://storage.googleapis.com/delf/"


@dataclass(frozen=True)
class OfficialModel:
    name: str
    url: str
    description: str
    abs_thres: float  # delf_local_config.score_threshold of the model's official config
    global_dim: int = 2048
    local_dim: int = 128
    gld_version: int = 2  # 1: Google-Landmarks v1; 2: Google-Landmarks v2 (clean)
    use_local_features: bool = True
    config_file: str = ""  # the official config it was taken from (for reference)


MODELS: dict[str, OfficialModel] = {
    m.name: m
    for m in (
        OfficialModel(
            name="delg-r50-gldv1",
            url=_BASE_URL + "r50delg_gld_20200814.tar.gz",
            description="DELG ResNet-50, trained on Google-Landmarks v1",
            abs_thres=175.0,
            gld_version=1,
            config_file="r50delg_gld_config.pbtxt",
        ),
        OfficialModel(
            name="delg-r101-gldv1",
            url=_BASE_URL + "r101delg_gld_20200814.tar.gz",
            description="DELG ResNet-101, trained on Google-Landmarks v1",
            abs_thres=166.1,
            gld_version=1,
            config_file="r101delg_gld_config.pbtxt",
        ),
        OfficialModel(
            name="delg-r50-gldv2",
            url=_BASE_URL + "r50delg_gldv2clean_20200914.tar.gz",
            description="DELG ResNet-50, trained on Google-Landmarks v2 (clean)",
            abs_thres=454.6,
            gld_version=2,
            config_file="r50delg_gldv2clean_config.pbtxt",
        ),
        OfficialModel(
            name="delg-r101-gldv2",
            url=_BASE_URL + "r101delg_gldv2clean_20200914.tar.gz",
            description="DELG ResNet-101, trained on Google-Landmarks v2 (clean)",
            abs_thres=357.48,
            gld_version=2,
            config_file="r101delg_gldv2clean_config.pbtxt",
        ),
    )
}
