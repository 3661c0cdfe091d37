-- clipline curation rules. Edit freely: this file is the rule set.
--
-- Each rule is a block that starts with a line "-- rule: <name>" followed by ONE SQL boolean
-- expression (DuckDB dialect) that is TRUE when the row must be DROPPED. A NULL result keeps the
-- row. Rules are tried in the order of this file, and a row that several rules would drop is
-- counted under the FIRST one. After these rules come, in this order, the rules that need more
-- than one row or a model (see clipline/components/curate/stage.py):
--   language            langid names another language than [curate] language, confidently
--   eval_contamination  the image is within phash_max_distance bits of an eval-set image
--   dup_url             same URL as a row kept earlier
--   dup_key             same sample key as a row kept earlier (keys must be unique in a snapshot)
--   dup_image           same stored-image sha256 as a row kept earlier
--   dup_caption_image   same normalised caption AND same sha256 as a row kept earlier
--   near_dup_image      perceptual hash within phash_max_distance bits of a row kept earlier
--   near_dup_caption    caption MinHash-similar to a caption kept earlier (off by default)
--
-- Columns available: key, url, caption (already normalised: NFC, mojibake repaired, whitespace
-- collapsed, control characters removed), status, width, height, original_width,
-- original_height (NULL when unknown), sha256, phash.
-- {placeholders} are filled from the [curate] config section; {blocklist_regex} is built from
-- the blocklist file (one term per line, matched as whole words, case-insensitive). Patterns
-- match case-insensitively with RE2's (?i) flag rather than on lower(caption): the same matches
-- without building a lower-cased copy of every caption.

-- rule: failed_download
status IS DISTINCT FROM 'success'

-- rule: missing_key
key IS NULL OR key = ''

-- rule: image_too_small
least(coalesce(original_width, width), coalesce(original_height, height)) < {min_image_side}

-- rule: aspect_ratio
greatest(coalesce(original_width, width), coalesce(original_height, height))
  > {max_aspect_ratio} * least(coalesce(original_width, width), coalesce(original_height, height))

-- rule: missing_caption
caption IS NULL OR caption = ''

-- rule: caption_is_pattern
-- the whole caption is a URL, a camera file name, no letter at all (digits, punctuation,
-- symbols), or a file name. The file-name pattern is tried only on captions that end with one of
-- its extensions (RE2 checks a pattern anchored at the end from the end): matched in full, it
-- would read every caption to its end, while the others give up at the first character that
-- rules them out
regexp_full_match(caption,
  '(?i)(https?://|www\.)\S+'                                              -- only a URL
  || '|(img|dsc|dscn|dscf|pxl|dcim|photo|image|pic|screenshot)[_\- ]?[\d_\- ]+'  -- camera name
  || '|[^\pL]+')                                          -- no letter (of any script)
OR (regexp_matches(caption, '(?i)\.(jpe?g|png|gif|webp|bmp|tiff?|heic|avif)$') AND regexp_full_match(caption,
  '(?i)[\w\-. ()\[\]]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic|avif)'))     -- only a file name

-- rule: too_few_words
-- fewer than {min_caption_words} space-separated words, i.e. fewer than {min_caption_words} - 1
-- spaces: {min_words_like} is '%' followed by that many ' %' (for 3 words: '% % %'). The same
-- rows as len(string_split(caption, ' ')) < {min_caption_words}, without splitting every caption
caption NOT LIKE {min_words_like}

-- rule: too_few_chars
length(caption) < {min_caption_chars}

-- rule: too_long
length(caption) > {max_caption_chars}

-- rule: blocklisted
regexp_matches(caption, {blocklist_regex})
