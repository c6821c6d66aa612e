"""The words of gru_mem's synthetic tasks and prompts: the built-in tokenizer makes each one token.

Synthetic generators draw haystack, key and value words from these lists; prompt templates are
written mostly in `PROMPT_WORDS`. Text outside these lists still encodes (byte by byte).
"""

# Filler words for the built-in haystack: plain, frequent English.
HAYSTACK_WORDS = tuple("""
the a an of to in on at by for with from into over under about after before between during
and or but so then than because while when where which who whom whose that this these those
is are was were be been being has have had do does did can could will would should may might
it its they them their there here we our you your he his she her i me my one two three many
some all each every other another more most less few such same new old good great small large
long short high low early late first last next own right left big little young real whole full
time year day week month night morning evening world life house home city town country road
river sea mountain forest field garden door window room table chair book letter paper story
word name idea plan work job school class team group family friend child man woman people
water fire stone wood glass metal bread fruit tree flower bird fish horse dog cat animal
light dark color sound voice song music picture image face hand eye head heart mind body
walk run read write speak listen look watch build make take give find keep hold bring carry
open close start stop begin end turn move change grow live learn teach help play sing draw
think know feel see hear say tell ask answer call show try use need want like love
quiet loud warm cold bright soft hard quick slow calm strong weak clear simple strange
always never often sometimes usually again also still just even only very quite almost
market village harbor bridge tower castle island valley meadow library museum station
morning winter summer spring autumn weather rain snow wind cloud storm sun moon star sky
""".split())

# Keys and values for needles (nouns and adjectives that read well as "the X of Y").
KEY_ADJECTIVES = tuple("""
amber azure brave crimson dusty eager fancy gentle golden humble icy jolly keen lively
misty noble olive proud quiet rapid silver tidy urban vivid witty zesty bold calm
""".split())
KEY_NOUNS = tuple("""
apple badge cabin dragon engine falcon garden hammer igloo jacket kettle lantern magnet
needle orchard pepper quartz rocket saddle tunnel umbrella violin wagon yacht zebra anchor
""".split())
VALUE_WORDS = tuple("""
alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november
oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu
""".split())

# Words the prompts, needles and answers are written in.
PROMPT_WORDS = tuple("""
problem question memory section document chunk evidence answer final boxed update check next
continue end yes no think reason relevant previous current new keep replace read remember
following given please based only write short note notes format respond response inside tags
special magic number value key number id code secret hidden what which who where is the of for
none nothing found unknown about linked refers points belongs
system user assistant you are helpful
reading far if else holds any add added now enough using briefly
numbers ids
""".split())

PUNCTUATION = ("<", ">", "</", "/", "{", "}", "\\", ".", ",", ":", ";", "?", "!", "'", '"',
               "(", ")", "-", "_", "=", "+", "*", "#", "\n", "\n\n")


def all_words() -> tuple[str, ...]:
  """Every word the built-in tokenizer is trained to keep whole, without duplicates, in order."""
  seen: dict[str, None] = {}
  for group in (PROMPT_WORDS, HAYSTACK_WORDS, KEY_ADJECTIVES, KEY_NOUNS, VALUE_WORDS):
    for word in group:
      seen.setdefault(word, None)
  return tuple(seen)
