"""The documented shapes of ``delg-geo serve``'s answers, for its OpenAPI description (the
responses themselves are ``Prediction.to_dict()``, not re-validated)."""

from typing import Optional

from pydantic import BaseModel, Field


class PlaceOut(BaseModel):
    name: str = Field(description="nearest GeoNames place (population >= 1000)")
    admin1: str = Field(description="first-level region, e.g. Veneto")
    country_code: str = Field(description="ISO 3166-1 alpha-2")

class NeighbourOut(BaseModel):
    id: int
    image: str
    lat: float
    lon: float
    similarity: float
    inliers: int

class AlternativeOut(BaseModel):
    id: int
    image: str
    lat: float
    lon: float
    score: float
    inliers: int
    similarity: float
    distance_km: float
    place: Optional[PlaceOut] = None

class PredictionOut(BaseModel):
    """``delg-geo query --json`` (``Prediction.to_dict()``) plus the place name."""

    image: str = Field(description="the uploaded file's name")
    lat: float
    lon: float
    method: str = Field(description="'verified' (geometrically verified neighbour) or 'global'")
    confidence: float = Field(ge=0, le=1)
    inliers: int
    neighbour: NeighbourOut
    alternatives: list[AlternativeOut]
    timings_ms: dict[str, float]
    note: str
    place: PlaceOut
    confidence_radius_km: float = Field(description="confidence is the probability of being this close to the truth")
    calibrated: bool = Field(description="false: the index has no calibration and confidence is only a score")
    confidence_text: str = Field(description="the confidence in words, e.g. 'likely within 100 m: 83%'")

class ErrorOut(BaseModel):
    detail: str
