"""A 5×7 bitmap font drawn with PIL rectangles.

PIL's own default font is a FreeType font whose anti-aliased rendering can
change with the FreeType/Pillow build; our frozen eval splits must render
bit-identically everywhere, so text is drawn from these glyphs instead.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from PIL import ImageDraw

GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7

_GLYPHS = """
A .###. #...# #...# ##### #...# #...# #...#
B ####. #...# #...# ####. #...# #...# ####.
C .###. #...# #.... #.... #.... #...# .###.
D ###.. #..#. #...# #...# #...# #..#. ###..
E ##### #.... #.... ####. #.... #.... #####
F ##### #.... #.... ####. #.... #.... #....
G .###. #...# #.... #.### #...# #...# .####
H #...# #...# #...# ##### #...# #...# #...#
I .###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
J ..### ...#. ...#. ...#. ...#. #..#. .##..
K #...# #..#. #.#.. ##... #.#.. #..#. #...#
L #.... #.... #.... #.... #.... #.... #####
M #...# ##.## #.#.# #.#.# #...# #...# #...#
N #...# #...# ##..# #.#.# #..## #...# #...#
O .###. #...# #...# #...# #...# #...# .###.
P ####. #...# #...# ####. #.... #.... #....
Q .###. #...# #...# #...# #.#.# #..#. .##.#
R ####. #...# #...# ####. #.#.. #..#. #...#
S .#### #.... #.... .###. ....# ....# ####.
T ##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..
U #...# #...# #...# #...# #...# #...# .###.
V #...# #...# #...# #...# #...# .#.#. ..#..
W #...# #...# #...# #.#.# #.#.# #.#.# .#.#.
X #...# #...# .#.#. ..#.. .#.#. #...# #...#
Y #...# #...# .#.#. ..#.. ..#.. ..#.. ..#..
Z ##### ....# ...#. ..#.. .#... #.... #####
0 .###. #...# #..## #.#.# ##..# #...# .###.
1 ..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.
2 .###. #...# ....# ...#. ..#.. .#... #####
3 ##### ...#. ..#.. ...#. ....# #...# .###.
4 ...#. ..##. .#.#. #..#. ##### ...#. ...#.
5 ##### #.... ####. ....# ....# #...# .###.
6 ..##. .#... #.... ####. #...# #...# .###.
7 ##### ....# ...#. ..#.. .#... .#... .#...
8 .###. #...# #...# .###. #...# #...# .###.
9 .###. #...# #...# .#### ....# ...#. .##..
"""


def _parse(table: str) -> Dict[str, List[str]]:
    glyphs = {}
    for line in table.strip().splitlines():
        char, *rows = line.split()
        assert len(rows) == GLYPH_HEIGHT and all(len(r) == GLYPH_WIDTH for r in rows), char
        glyphs[char] = rows
    return glyphs


GLYPHS: Dict[str, List[str]] = _parse(_GLYPHS)
CHARACTERS = "".join(sorted(GLYPHS))


def text_size(text: str, scale: int = 1, spacing: int = 1) -> Tuple[int, int]:
    """Width and height in pixels of ``text`` drawn by :func:`draw_text`."""
    if not text:
        return 0, 0
    width = len(text) * GLYPH_WIDTH * scale + (len(text) - 1) * spacing * scale
    return width, GLYPH_HEIGHT * scale


def draw_text(draw: ImageDraw.ImageDraw, xy: Tuple[int, int], text: str, fill, scale: int = 1, spacing: int = 1) -> None:
    """Draw ``text`` (characters of :data:`CHARACTERS`) with its top-left corner at ``xy``."""
    x0, y0 = xy
    for position, char in enumerate(text):
        rows = GLYPHS[char]
        left = x0 + position * (GLYPH_WIDTH + spacing) * scale
        for row, bits in enumerate(rows):
            for column, bit in enumerate(bits):
                if bit == "#":
                    x, y = left + column * scale, y0 + row * scale
                    draw.rectangle([x, y, x + scale - 1, y + scale - 1], fill=fill)
