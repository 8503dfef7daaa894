"""The word lists, date range and country/currency table the built-in task suites draw from.

Kept apart from the generators in ``suites.py`` so each file stays one idea:
these are data, checked once at import (``COUNTRY_CURRENCIES`` keeps only the
countries and codes ``pycountry`` knows).
"""

from __future__ import annotations

import datetime as dt

import pycountry

# fmt: off
NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Nina", "Omar", "Zoe")
ITEMS = ("apples", "pencils", "books", "marbles", "cookies", "stickers", "cards", "coins", "shells", "stamps")

COMMON_WORDS = (
    "apple", "river", "green", "stone", "cloud", "bread", "music", "table", "horse", "light",
    "water", "paper", "plant", "chair", "happy", "quick", "brown", "small", "sweet", "clean",
    "house", "garden", "window", "forest", "silver", "winter", "summer", "orange", "yellow", "purple",
    "tiger", "lemon", "sugar", "candle", "rocket", "pencil", "basket", "bridge", "castle", "dragon",
    "planet", "rabbit", "monkey", "turtle", "spider", "wolf", "bear", "fish", "bird", "frog",
    "road", "lamp", "door", "milk", "rice", "salt", "gold", "blue", "red", "dark",
    "soft", "warm", "cold", "tall", "long", "fast", "slow", "loud", "calm", "bright",
    "ocean", "beach", "sand", "snow", "rain", "wind", "storm", "star", "moon", "sun",
    "city", "town", "farm", "field", "hill", "lake", "island", "valley", "desert", "meadow",
    "doctor", "farmer", "singer", "painter", "teacher", "pilot", "baker", "sailor", "hunter", "writer",
    "kettle", "mirror", "pillow", "blanket", "ladder", "hammer", "button", "ribbon", "bottle", "jacket",
)

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
CODA = "lmnrst"

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2050, 12, 31)

POSITIVE_WORDS = (
    "wonderful", "great", "excellent", "delightful", "amazing", "fantastic", "lovely", "superb",
    "pleasant", "brilliant", "charming", "enjoyable", "perfect", "marvelous", "splendid", "terrific",
    "beautiful", "friendly", "impressive", "outstanding",
)
NEGATIVE_WORDS = (
    "terrible", "awful", "horrible", "dreadful", "disappointing", "boring", "poor", "bad",
    "unpleasant", "annoying", "miserable", "dull", "rude", "broken", "disgusting", "painful",
    "mediocre", "useless", "frustrating", "lousy",
)
REVIEW_SUBJECTS = (
    "the movie", "the soup", "the hotel room", "the service", "this phone", "the concert", "the book",
    "the pizza", "the game", "the trip", "the staff", "the coffee", "the show", "the class",
    "the museum", "the album", "the flight", "the dinner", "the park", "the app",
)
ADVERBS = ("really", "very", "truly", "quite", "absolutely")

# (display name, ISO 3166 alpha-2, ISO 4217 code): countries with a stable currency.
_COUNTRY_CURRENCY_TABLE = (
    ("Japan", "JP", "JPY"), ("the United States", "US", "USD"), ("the United Kingdom", "GB", "GBP"),
    ("China", "CN", "CNY"), ("India", "IN", "INR"), ("Canada", "CA", "CAD"), ("Australia", "AU", "AUD"),
    ("New Zealand", "NZ", "NZD"), ("Switzerland", "CH", "CHF"), ("Sweden", "SE", "SEK"),
    ("Norway", "NO", "NOK"), ("Denmark", "DK", "DKK"), ("Iceland", "IS", "ISK"), ("Poland", "PL", "PLN"),
    ("Czechia", "CZ", "CZK"), ("Hungary", "HU", "HUF"), ("Romania", "RO", "RON"), ("Turkey", "TR", "TRY"),
    ("Russia", "RU", "RUB"), ("Ukraine", "UA", "UAH"), ("Israel", "IL", "ILS"), ("Saudi Arabia", "SA", "SAR"),
    ("the United Arab Emirates", "AE", "AED"), ("Qatar", "QA", "QAR"), ("Kuwait", "KW", "KWD"),
    ("Egypt", "EG", "EGP"), ("South Africa", "ZA", "ZAR"), ("Nigeria", "NG", "NGN"), ("Kenya", "KE", "KES"),
    ("Morocco", "MA", "MAD"), ("Brazil", "BR", "BRL"), ("Mexico", "MX", "MXN"), ("Argentina", "AR", "ARS"),
    ("Chile", "CL", "CLP"), ("Colombia", "CO", "COP"), ("Peru", "PE", "PEN"), ("South Korea", "KR", "KRW"),
    ("Singapore", "SG", "SGD"), ("Thailand", "TH", "THB"), ("Indonesia", "ID", "IDR"),
    ("Malaysia", "MY", "MYR"), ("the Philippines", "PH", "PHP"), ("Vietnam", "VN", "VND"),
    ("Pakistan", "PK", "PKR"), ("Bangladesh", "BD", "BDT"), ("Sri Lanka", "LK", "LKR"), ("Nepal", "NP", "NPR"),
    ("Jordan", "JO", "JOD"), ("Tunisia", "TN", "TND"), ("Algeria", "DZ", "DZD"), ("Ethiopia", "ET", "ETB"),
    ("Tanzania", "TZ", "TZS"), ("Uganda", "UG", "UGX"), ("Georgia", "GE", "GEL"), ("Armenia", "AM", "AMD"),
    ("Kazakhstan", "KZ", "KZT"), ("Mongolia", "MN", "MNT"), ("Serbia", "RS", "RSD"), ("Oman", "OM", "OMR"),
    ("Bahrain", "BH", "BHD"), ("Jamaica", "JM", "JMD"), ("Uruguay", "UY", "UYU"), ("Paraguay", "PY", "PYG"),
    ("Bolivia", "BO", "BOB"), ("Costa Rica", "CR", "CRC"), ("Guatemala", "GT", "GTQ"),
    ("the Dominican Republic", "DO", "DOP"), ("Ecuador", "EC", "USD"), ("Germany", "DE", "EUR"),
    ("France", "FR", "EUR"), ("Italy", "IT", "EUR"), ("Spain", "ES", "EUR"), ("Portugal", "PT", "EUR"),
    ("the Netherlands", "NL", "EUR"), ("Belgium", "BE", "EUR"), ("Austria", "AT", "EUR"),
    ("Ireland", "IE", "EUR"), ("Finland", "FI", "EUR"), ("Greece", "GR", "EUR"),
)

CURRENCY_TEMPLATES = (
    "What is the currency code of {}?",
    "What is the ISO 4217 currency code of {}?",
    "Which currency code is used in {}?",
    "Give the three-letter currency code of {}.",
    "Name the currency code of {}.",
    "What currency code is used by {}?",
    "Write the ISO currency code for {}.",
    "What is the three-letter code of the currency of {}?",
    "Tell me the currency code of {}.",
    "State the currency code used by {}.",
)
# fmt: on


def _verified_currencies() -> dict[str, str]:
    """Country display name -> currency code, keeping only entries pycountry knows."""
    table = {}
    for name, alpha_2, code in _COUNTRY_CURRENCY_TABLE:
        if pycountry.countries.get(alpha_2=alpha_2) and pycountry.currencies.get(alpha_3=code):
            table[name] = code
    return table


COUNTRY_CURRENCIES: dict[str, str] = _verified_currencies()
COUNTRY_NAMES = tuple(COUNTRY_CURRENCIES)
