"""A default colour for each channel, from its name: the viewer's napari colormaps and the OME
``Channel Color`` of each recording. No Qt.

Why: several channels are shown overlaid (additive blending), so each needs its own colour, and
the colour a biologist expects follows the fluorophore or the excitation line in the channel
preset's name: GFP/GCaMP/FITC/488 green, RFP/tdTomato/mCherry/561/Cy3 magenta, DAPI/Hoechst/405
blue, Cy5/640/far-red red. A name that says nothing takes the next free colour of a fixed cycle
(green, magenta, cyan, yellow). Two channels of one acquisition never share a colour while the
palette has one left. A transmitted-light channel (brightfield, DIC, phase) is grey.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Colours for names that say nothing, in order (napari colormap names).
CYCLE = ("green", "magenta", "cyan", "yellow")
#: What is left when a colour is taken: the cycle, then the rest of napari's primaries.
PALETTE = CYCLE + ("red", "blue")
#: A single channel: grey shows the most intensity levels (napari's default too).
SINGLE_CHANNEL = "gray"

# (keys, acceptable colours best first). A key matches inside the lower-cased name ("egfp" has
# "gfp"); a key written "=key" only as a whole word of it ("dic", not "indicator"). Checked in
# order: far-red before red ("iRFP" contains "rfp"), yellow and cyan before green.
_FAMILIES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("brightfield", "bright field", "bright-field", "=bf", "=dic", "phase", "=trans", "transmitted",
      "dodt"), ("gray",)),
    (("far-red", "far_red", "farred", "far red", "cy5", "cy7", "irfp", "alexa647", "af647", "=apc", "draq5",
      "atto647", "mkate"), ("red", "magenta")),
    (("rfp", "tdtomato", "tomato", "mcherry", "cherry", "mscarlet", "scarlet", "dsred", "tritc", "cy3",
      "texas", "txred", "rhod", "rgeco", "rcamp", "alexa568", "alexa594", "af568", "af594", "mruby",
      "tagrfp", "=red"), ("magenta", "red")),
    (("yfp", "venus", "citrine", "ypet", "eyfp"), ("yellow",)),
    (("cfp", "cerulean", "turquoise", "teal", "ecfp", "mtfp"), ("cyan",)),
    (("dapi", "hoechst", "bfp", "blue", "=uv", "alexa405", "af405", "bv421"), ("blue", "cyan")),
    (("gfp", "gcamp", "fitc", "alexa488", "af488", "fluo", "green", "egfp", "neongreen", "clover", "emerald",
      "jgcamp", "sfgfp", "mnegreen"), ("green",)),
)
_WAVELENGTH = re.compile(r"(?<!\d)(3[5-9]\d|[4-7]\d\d)(?!\d)")


def _wavelength_colors(nm: int) -> tuple[str, ...]:
    """Colours for an excitation (or emission) line in nm."""
    if nm < 430:
        return ("blue", "cyan")
    if nm < 470:
        return ("cyan",)
    if nm < 505:
        return ("green",)
    if nm < 530:
        return ("yellow",)
    if nm < 620:
        return ("magenta", "red")
    return ("red", "magenta")


def preferred_colors(name: str) -> tuple[str, ...]:
    """The colours a channel called ``name`` may take, best first; () when the name says nothing."""
    lower = name.lower()
    words = set(re.split(r"[^a-z0-9]+", lower))
    for keys, colors in _FAMILIES:
        if any(k[1:] in words if k.startswith("=") else k in lower for k in keys):
            return colors
    match = _WAVELENGTH.search(lower)
    return _wavelength_colors(int(match.group(1))) if match else ()


def channel_colormaps(names: Sequence[str]) -> dict[str, str]:
    """A napari colormap name for each channel name; one channel alone is grey.

    Channels whose names say something choose first, in order; the others then take the free
    colours of `CYCLE` in order. A preferred colour already taken passes to the next acceptable
    one, then to the palette, so that overlaid channels stay apart.
    """
    names = list(dict.fromkeys(names))
    if len(names) <= 1:
        return {n: SINGLE_CHANNEL for n in names}
    chosen: dict[str, str] = {}
    taken: set[str] = set()

    def first_free(options: Sequence[str]) -> str | None:
        return next((c for c in options if c not in taken or c == "gray"), None)

    for name in names:  # the names that say something first
        options = preferred_colors(name)
        if options:
            color = first_free(options) or first_free(PALETTE) or options[0]
            chosen[name] = color
            taken.add(color)
    for n, name in enumerate(names):
        if name not in chosen:
            color = first_free(CYCLE) or first_free(PALETTE) or PALETTE[n % len(PALETTE)]
            chosen[name] = color
            taken.add(color)
    return {name: chosen[name] for name in names}


#: Each colormap's colour for drawing with Qt (traces, labels): a little lighter than the
#: colormap's top so that thin lines read on a dark background.
DISPLAY_RGB: dict[str, tuple[int, int, int]] = {
    "green": (80, 220, 120),
    "magenta": (235, 90, 235),
    "cyan": (70, 215, 235),
    "yellow": (235, 225, 70),
    "red": (245, 85, 85),
    "blue": (110, 140, 255),
    "gray": (80, 220, 120),  # a lone grey channel keeps the viewer's usual green trace
}


#: Each colormap's pure colour, for the OME ``Channel Color`` Fiji shows a recording's channel in.
OME_RGB: dict[str, tuple[int, int, int]] = {
    "green": (0, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "yellow": (255, 255, 0),
    "red": (255, 0, 0),
    "blue": (0, 0, 255),
    "gray": (255, 255, 255),
}


def ome_color(name: str) -> int | None:
    """OME Channel ``Color`` (RGBA as a signed 32-bit int) for a channel called ``name``, or None
    when the name says nothing: a default only, so that Fiji (Bio-Formats) shows each channel of
    a recording in the colour its name implies rather than every channel in grey. A recording holds
    one channel per file, so this is the channel's first preference (`preferred_colors`)."""
    options = preferred_colors(name)
    if not options:
        return None
    r, g, b = OME_RGB[options[0]]
    rgba = (r << 24) | (g << 16) | (b << 8) | 255
    return rgba - (1 << 32) if rgba >= 1 << 31 else rgba
