"""Synthetic metadata-only raw shards with planted problems, for the curate benchmark and the
spill test (no image bytes: they measure the metadata path, rules and deduplication).

Two caption mixes (``captions=``):

- ``"ascii"`` (default): English template captions, all printable ASCII. Every one is already in
  normal form, so the caption normaliser (ftfy, NFC, whitespace) never runs, and langid's compiled
  kernel settles almost all of them on its fast path (English's lead bound).
- ``"web"``: captions like those of a web crawl that an English model is curated from, so the
  normaliser's slow path and the language rule's full scoring run on a realistic share of rows.
  Shares of the captions (:data:`WEB_SHARES`; a row's kind is drawn independently; the planted
  problems below then replace some captions, as in the ascii mix):

  ==============================================  =====  ===============================================
  kind                                            share  example
  ==============================================  =====  ===============================================
  English, printable ASCII, already normal        56%    ``a photo of a red car near the lake 17``
  English, ASCII needing the normaliser           4%     ``Salt & Pepper  the red car 17`` (``&``, double,
                                                         edge spaces, tabs)
  camera or file names, product codes (ASCII)     2%     ``IMG_0017.JPG``, ``DSC00017``
  English with non-ASCII Latin / typography       8%     ``café``, ``“vintage”``, ``don’t``, ``25 °C``,
                                                         no-break spaces
  English with HTML entities                      3%     ``Tom &amp; Jerry``, ``it&#39;s``
  English with mojibake (UTF-8 read as cp1252)    2%     ``cafÃ©``, ``donâ€™t``
  English with emoji                              2%     ``😍``, ``👍🏽``, ``🇫🇷``, ZWJ families
  other languages, Latin script with diacritics   12%    fr, de, es, it, pt, nl, pl, tr, sv, vi
  Cyrillic                                        4%     ru, uk
  CJK                                             5%     zh, ja (with and without spaces), ko
  other scripts                                   2%     ar, fa, he, el, hi, th
  ==============================================  =====  ===============================================

  That is 62% printable ASCII (the brief's "about 60% English ASCII"), 77% English and 23% other
  languages. Why these shares: LAION-5B's 5.85B pairs split into 2.32B English, 2.26B in 100+
  other languages (Russian, French, German, Spanish, Chinese and Japanese the largest) and 1.27B
  with no language detected (Schuhmann et al. 2022); a list ingested to train an English model
  leans English (a crawl of mostly English sites, or a list pre-filtered by a cheap language
  hint) but still carries a fifth to a quarter of other languages for the language rule to drop,
  and its English captions carry web text's typographic quotes, accented names, entities left
  escaped by scrapers, double-decoded UTF-8 and emoji. The shares are a model of such a list,
  chosen with those figures in mind, not measured from one crawl: change :data:`WEB_SHARES` to
  model another. Within a group the languages (and the phrases) are drawn uniformly.

Both mixes append the row number to every caption, so no two captions are the same (as in a
crawl, where exact caption repeats are rare outside the planted duplicates). The web mix draws
from its own random stream: the planted problems, URLs, hashes and sizes are the same rows as in
the ascii mix for the same seed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipline.components.ingest.schema import RAW_SCHEMA

CAPTION_MIXES = ("ascii", "web")


def register(
    catalog_path: Path, raw_dir: Path, n: int, shard_rows: int, seed: int = 0, captions: str = "ascii"
) -> list[str]:
    """:func:`generate` the shards and record them in the catalog; returns their ids."""
    from clipline.components.catalog import Catalog

    shards = generate(raw_dir, n, shard_rows, seed, captions=captions)
    with Catalog(catalog_path) as cat:
        for sid, path, table in shards:
            cat.record_raw_shard(sid, path, table, {"synthetic": True, "captions": captions})
    return [sid for sid, _, _ in shards]


ADJ = "red blue green yellow black white small large old new quiet busy bright dark happy wooden".split()
NOUN = (
    "house car dog cat tree river mountain city street beach table chair window garden flower family "
    "child woman man road bridge lake forest field boat train station park kitchen church market"
).split()
PLACE = "near the | in front of the | next to a | behind the | on top of the | inside the".split(" | ")
TEMPLATE = [
    "a photo of a {a} {n} {p} {n2}",
    "the {a} {n} {p} {n2} at sunset",
    "{a} {n} and a {a2} {n2} in the morning",
    "a picture of the {n} {p} {n2}",
    "close up of a {a} {n} with a {n2} in the background",
]
FOREIGN = [
    "un chat noir dort sur la table de la cuisine",
    "ein roter Kreis auf einem blauen Hintergrund",
    "una casa blanca junto al mar en verano",
    "uma menina brincando no parque com o cachorro",
]

# ---------------------------------------------------------------- the web mix (see the module doc)
#: kind -> share of captions in the web mix (sums to 1)
WEB_SHARES = {
    "en_ascii": 0.56,
    "en_ascii_messy": 0.04,
    "file_name": 0.02,
    "en_unicode": 0.08,
    "en_entities": 0.03,
    "en_mojibake": 0.02,
    "en_emoji": 0.02,
    "latin_other": 0.12,
    "cyrillic": 0.04,
    "cjk": 0.05,
    "other_script": 0.02,
}

#: ASCII additions that the normaliser has to look at (``&``, whitespace) but mostly leaves alone
MESSY = ["Salt & Pepper", "R&B", "Black & White", "Tom & Jerry", "A&W"]
FILE_NAMES = [
    "IMG_{i:04d}.JPG",
    "DSC{i:05d}",
    "photo-{i}.jpg",
    "product_{i}_front.png",
    "PXL_2023{i:07d}",
    "Screenshot {i}.png",
]
#: English web text's non-ASCII: typography, accented names and loanwords, units, no-break space
UNICODE_EN = [
    "café",
    "São Paulo",
    "Zürich",
    "naïve",
    "crème brûlée",
    "“vintage”",
    "— 2019 edition",
    "don’t miss",
    "…",
    "10 × 20 cm",
    "25 °C",
    "© studio",
    "Škoda",
    "piñata",
    "Beyoncé",
    "½ price",
    "Pokémon",
    "Málaga\u00a0beach",
    "façade",
    "jalapeño",
]
ENTITIES = [
    "Tom &amp; Jerry",
    "&quot;summer sale&quot;",
    "it&#39;s",
    "caf&eacute;",
    "rock&nbsp;and&nbsp;roll",
    "R&amp;B",
    "&lt;3",
    "50&#37; off",
    "&#8220;vintage&#8221;",
    "Q&amp;A",
]


def _mojibake(s: str) -> str | None:
    """``s`` as a page that decoded UTF-8 bytes as cp1252 shows it (None when cp1252 cannot)."""
    try:
        return s.encode("utf-8").decode("cp1252")
    except UnicodeDecodeError:
        return None


MOJIBAKE = [m for s in UNICODE_EN if (m := _mojibake(s)) is not None and m != s]
EMOJI = ["😍", "❤️", "🔥", "🐶", "🌅", "👍🏽", "🇫🇷", "👨\u200d👩\u200d👧", "✨", "🎄", "😂😂", "🏖️"]
LATIN_OTHER = {
    "fr": [
        "une maison blanche au bord de la mer",
        "un chat noir dort sur le canapé",
        "vue aérienne de la ville la nuit",
        "robe d'été à fleurs pour femme",
        "les enfants jouent dans le jardin",
        "gâteau au chocolat fait maison",
        "église médiévale en pierre",
        "coucher de soleil sur le lac",
    ],
    "de": [
        "ein roter Apfel auf dem Holztisch",
        "Blick über die Berge im Winter",
        "Kinder spielen im Garten hinter dem Haus",
        "gemütliches Wohnzimmer mit großem Fenster",
        "Straße in der Altstadt bei Nacht",
        "frisches Brot aus der Bäckerei",
        "Hund läuft über die grüne Wiese",
        "schöne Brücke über den Fluss",
    ],
    "es": [
        "una casa blanca junto al mar",
        "niños jugando en el parque",
        "vista de la ciudad desde la montaña",
        "vestido de fiesta para mujer",
        "comida típica de la región",
        "atardecer en la playa con palmeras",
        "perro pequeño durmiendo en el sofá",
        "calle antigua del centro histórico",
    ],
    "it": [
        "una piazza antica nel centro della città",
        "pasta fresca fatta in casa",
        "vista del lago al tramonto",
        "bambini che giocano sulla spiaggia",
        "chiesa di campagna in primavera",
        "cucina moderna con isola centrale",
    ],
    "pt": [
        "uma menina brincando no parque",
        "praia com água cristalina no verão",
        "casa de campo com jardim florido",
        "pão de queijo caseiro na mesa",
        "vista aérea da cidade à noite",
        "cachorro correndo na areia",
    ],
    "nl": [
        "een oude molen aan de rivier",
        "kinderen spelen in de tuin",
        "fietsen langs de gracht in Amsterdam",
        "verse groenten op de markt",
        "een huis met een rode deur",
    ],
    "pl": [
        "stary zamek na wzgórzu o zachodzie słońca",
        "dzieci bawią się w ogrodzie",
        "widok na góry zimą",
        "świeży chleb na drewnianym stole",
        "kościół w małej wsi",
    ],
    "tr": [
        "deniz kenarında beyaz bir ev",
        "çocuklar parkta oynuyor",
        "İstanbul'da gün batımı manzarası",
        "ahşap masada taze ekmek",
        "karlı dağların görünümü",
    ],
    "sv": [
        "ett rött hus vid sjön",
        "barn som leker i trädgården",
        "utsikt över fjällen på vintern",
        "nybakat bröd på köksbordet",
    ],
    "vi": [
        "ngôi nhà nhỏ bên bờ sông",
        "trẻ em chơi trong công viên",
        "cảnh hoàng hôn trên biển",
        "bánh mì nóng trên bàn gỗ",
    ],
}
CYRILLIC = {
    "ru": [
        "красный дом у реки",
        "дети играют в парке летом",
        "вид на горы зимой",
        "свежий хлеб на деревянном столе",
        "старая церковь в маленькой деревне",
        "кошка спит на диване",
        "закат над морем",
    ],
    "uk": [
        "будинок біля річки влітку",
        "діти граються в саду",
        "вид на гори взимку",
        "свіжий хліб на дерев'яному столі",
    ],
}
CJK = {
    "zh": [
        "一只小猫在沙发上睡觉",
        "城市夜景 高楼 灯光",
        "海边的日落风景",
        "新鲜的水果和蔬菜",
        "古老的寺庙 在山上",
        "女士夏季连衣裙 新款",
        "北京故宫的雪景",
    ],
    "ja": [
        "公園で遊ぶ子供たち",
        "東京の夜景と高層ビル",
        "海辺の夕日がきれいです",
        "手作りのケーキとコーヒー",
        "桜 の 花 と 青い 空",
        "猫が窓辺で寝ている",
    ],
    "ko": [
        "바닷가의 아름다운 일몰",
        "공원에서 노는 아이들",
        "서울의 밤 풍경",
        "나무 테이블 위의 신선한 빵",
        "창가에서 자는 고양이",
    ],
}
OTHER_SCRIPT = {
    "ar": ["منزل أبيض بجانب البحر", "أطفال يلعبون في الحديقة", "غروب الشمس فوق الصحراء", "خبز طازج على طاولة خشبية"],
    "fa": ["خانه\u200cای سفید کنار دریا", "کودکان در پارک بازی می\u200cکنند", "غروب آفتاب در کویر"],
    "he": ["בית לבן ליד הים", "ילדים משחקים בפארק", "שקיעה מעל העיר"],
    "el": ["ένα λευκό σπίτι δίπλα στη θάλασσα", "παιδιά παίζουν στο πάρκο", "ηλιοβασίλεμα στο νησί"],
    "hi": ["समुद्र के किनारे सफेद घर", "पार्क में खेलते बच्चे", "पहाड़ों पर सूर्यास्त"],
    "th": ["บ้านสีขาวริมทะเล", "เด็กๆ เล่นในสวนสาธารณะ", "พระอาทิตย์ตกที่ชายหาด"],
}


def _phrases(langs: dict[str, list[str]]) -> list[list[str]]:
    return list(langs.values())


_GROUPS = {
    "latin_other": _phrases(LATIN_OTHER),
    "cyrillic": _phrases(CYRILLIC),
    "cjk": _phrases(CJK),
    "other_script": _phrases(OTHER_SCRIPT),
}


def _web_captions(bases: list[str], idx: np.ndarray, rng: np.random.Generator) -> list[str]:
    """The web mix's captions for rows ``idx``, built on their English template texts ``bases``."""
    kinds = list(WEB_SHARES)
    kind = rng.choice(len(kinds), size=len(bases), p=np.array(list(WEB_SHARES.values())) / sum(WEB_SHARES.values()))
    r = rng.integers(0, 1 << 30, size=(len(bases), 4))
    out = []
    for j, (b, i) in enumerate(zip(bases, idx.tolist())):
        k, (r0, r1, r2, r3) = kinds[kind[j]], r[j]
        if k == "en_ascii":
            out.append(f"{b} {i}")
        elif k == "en_ascii_messy":
            extra = MESSY[r0 % len(MESSY)]
            out.append((f"{extra}  {b} {i}", f"{b} | {extra} {i} ", f" {b}\t{i}", f"{b} {i}  ")[r1 % 4])
        elif k == "file_name":
            out.append(FILE_NAMES[r0 % len(FILE_NAMES)].format(i=i))
        elif k in ("en_unicode", "en_entities", "en_mojibake", "en_emoji"):
            pool = {"en_unicode": UNICODE_EN, "en_entities": ENTITIES, "en_mojibake": MOJIBAKE, "en_emoji": EMOJI}[k]
            extra = pool[r0 % len(pool)]
            out.append(f"{extra} {b} {i}" if r1 % 3 == 0 else f"{b} {extra} {i}")
        else:  # another language: one or two phrases of one language of the group
            lang = _GROUPS[k][r0 % len(_GROUPS[k])]
            p1, p2 = lang[r1 % len(lang)], lang[r2 % len(lang)]
            out.append(f"{p1} {i}" if r3 % 2 else f"{p1}, {p2} {i}")
    return out


def generate(
    raw_dir: Path, n: int, shard_rows: int, seed: int = 0, captions: str = "ascii"
) -> list[tuple[str, Path, pa.Table]]:
    """Write ``n`` metadata-only raw shards rows (RAW_SCHEMA, no image bytes) of ``shard_rows``
    rows each into raw_dir; returns (shard_id, path, table) per shard. ``captions``: the caption
    mix, ``"ascii"`` or ``"web"`` (module doc). Planted problems (disjoint bands of a uniform draw,
    the same rows in both mixes): 3% failed downloads, 4% too-short captions, 3% small images, 1%
    non-English captions, 4% repeated URLs, 4% repeated sha256 (same pHash), 5% near-duplicate
    pHashes (1-6 bits flipped). Deterministic for a seed."""
    if captions not in CAPTION_MIXES:
        raise ValueError(f"captions must be one of {CAPTION_MIXES}, not {captions!r}")
    rng = np.random.default_rng(seed)
    web_rng = np.random.default_rng([seed, 1])  # its own stream: the other columns do not depend on the mix
    out = []
    base_hashes = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    for start in range(0, n, shard_rows):
        m = min(shard_rows, n - start)
        idx = np.arange(start, start + m)
        u = rng.random(m)
        keys = [f"{i:010d}" for i in idx]
        urls = [f"http://img.example/{i}.jpg" for i in idx]
        # captions: English templates filled with random words, plus the row number
        r = rng.integers(0, 1 << 30, size=(m, 6))
        bases = [
            TEMPLATE[r[j, 0] % len(TEMPLATE)].format(
                a=ADJ[r[j, 1] % len(ADJ)],
                a2=ADJ[r[j, 2] % len(ADJ)],
                n=NOUN[r[j, 3] % len(NOUN)],
                n2=NOUN[r[j, 4] % len(NOUN)],
                p=PLACE[r[j, 5] % len(PLACE)],
            )
            for j in range(m)
        ]
        if captions == "web":
            caps = _web_captions(bases, idx, web_rng)
        else:
            caps = [f"{b} {i}" for b, i in zip(bases, idx.tolist())]
        del bases
        sha = [f"{i:064x}" for i in idx]
        phash = base_hashes[start : start + m].copy()
        ow = np.full(m, 640, dtype=np.int32)
        oh = np.full(m, 480, dtype=np.int32)
        status = np.full(m, "success", dtype=object)
        # planted problems (disjoint bands of u)
        status[u < 0.03] = "failed_to_download"
        short = (u >= 0.03) & (u < 0.07)
        for j in np.flatnonzero(short):
            caps[j] = "nice"
        small = (u >= 0.07) & (u < 0.10)
        ow[small], oh[small] = 150, 120
        for j in np.flatnonzero((u >= 0.10) & (u < 0.11)):
            caps[j] = FOREIGN[j % len(FOREIGN)]
        earlier = lambda j: int(rng.integers(0, max(start + j, 1)))  # noqa: E731 - an earlier row
        for j in np.flatnonzero((u >= 0.11) & (u < 0.15)):
            urls[j] = f"http://img.example/{earlier(j)}.jpg"
        for j in np.flatnonzero((u >= 0.15) & (u < 0.19)):
            src = earlier(j)
            sha[j] = f"{src:064x}"
            phash[j] = base_hashes[src]
        for j in np.flatnonzero((u >= 0.19) & (u < 0.24)):
            h = int(base_hashes[earlier(j)]) & ((1 << 64) - 1)
            for bit in rng.choice(64, size=int(rng.integers(1, 7)), replace=False):
                h ^= 1 << int(bit)
            phash[j] = h - (1 << 64) if h >= (1 << 63) else h
        ok = status == "success"
        table = pa.table(
            {
                "key": keys,
                "url": urls,
                "caption": caps,
                "image": pa.nulls(m, pa.binary()),
                "width": pa.array(np.where(ok, 256, 0), pa.int32()),
                "height": pa.array(np.where(ok, 256, 0), pa.int32()),
                "original_width": pa.array(ow, pa.int32()),
                "original_height": pa.array(oh, pa.int32()),
                "sha256": sha,
                "phash": pa.array(phash, pa.int64()),
                "status": pa.array(status.tolist(), pa.string()),
                "error_kind": pa.array([None if s == "success" else "http_404" for s in status], pa.string()),
                "error_message": pa.array([None if s == "success" else "404" for s in status], pa.string()),
                "source": pa.array(["bench"] * m, pa.string()),
                "ingested_at": pa.array([datetime(2026, 1, 1, tzinfo=timezone.utc)] * m, pa.timestamp("us", tz="UTC")),
            },
            schema=RAW_SCHEMA,
        )
        shard_id = f"bench-{start // shard_rows:05d}"
        path = raw_dir / f"{shard_id}.parquet"
        pq.write_table(table, path)
        out.append((shard_id, path, table))
    return out
