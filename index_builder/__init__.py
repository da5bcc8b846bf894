"""Turning geotagged image collections into delg-geo indexes."""
