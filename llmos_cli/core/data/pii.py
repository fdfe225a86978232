"""Personal data masking: e-mail addresses, URLs, IBANs, credit-card numbers, IP addresses, phone numbers.

Each kind is a candidate pattern plus, where a checksum or a grammar exists, a validation: IBANs
pass ISO 13616 mod-97, card numbers an issuer prefix and the Luhn check, IPv6 addresses Python's
`ipaddress`. Phone numbers need a telephone layout (a `+` country code, `(555) 123-4567`,
`555-123-4567`, or a national trunk `0` with a separator), so that dates, version strings, sums and
identifiers in code stay as they are. Kinds run in a fixed order, so that a masked span is never
matched again as another kind.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

from llmos_cli.recipe import CleanSection

Masker = Callable[[str, str, Counter, str], str]  # (text, token, counts, kind) -> text

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]}]", re.IGNORECASE)
# printed in groups of four (the last may be shorter), or unbroken
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?|[A-Z0-9]{11,30})\b")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.])(?<![Vv]ersion ){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # +44 20 7946 0958, +1 (555) 123-4567
    r"|\(\d{3}\) ?\d{3}[-. ]\d{4}"  # (555) 123-4567
    r"|\d{3}([-. ])\d{3}\1\d{4}"  # 555-123-4567, 555.123.4567
    r"|0\d{1,4}[ /-]\d{3,4}[ -]?\d{2,4}"  # 030 1234567, 06-12345678, 0171 234 5678
    r")(?![\w-]|\.\d)"
)
# card issuers (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay) and their number lengths
_ISSUER = re.compile(
    r"4\d{12}(?:\d{3}){0,2}|5[1-5]\d{14}|2[2-7]\d{14}|3[47]\d{13}|6\d{15,18}|35\d{14}|3[0689]\d{12,17}"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: the country and check digits moved to the end, letters as 10..35, mod 97 is 1."""
    if not 15 <= len(iban) <= 34:
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _card(match: re.Match) -> bool:
    digits = re.sub(r"[ -]", "", match.group())
    return bool(_ISSUER.fullmatch(digits)) and luhn_ok(digits)


def _ipv6(match: re.Match) -> bool:
    groups = [g for g in match.group().split(":") if g]
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return False
    return len(groups) >= 3  # `::1`, `a::b` and slices like `x[::2]` are not worth a mask


def _phone(match: re.Match) -> bool:
    return 7 <= sum(ch.isdigit() for ch in match.group()) <= 15


def _mask_iban(text: str, token: str, counts: Counter, kind: str) -> str:
    """IBANs; a grouped candidate that ran on into the next word is shortened group by group."""

    def replace(match: re.Match) -> str:
        parts = match.group().split(" ")
        for k in range(len(parts), 0, -1):
            if iban_ok("".join(parts[:k])):
                counts[kind] += 1
                return " ".join([token, *parts[k:]])
        return match.group()

    return IBAN.sub(replace, text)


def _masker(pattern: re.Pattern, valid: Callable[[re.Match], bool] | None) -> Masker:
    """Replace every match of `pattern` that `valid` accepts."""

    def mask(text: str, token: str, counts: Counter, kind: str) -> str:
        def replace(match: re.Match) -> str:
            if valid is not None and not valid(match):
                return match.group()
            counts[kind] += 1
            return token

        return pattern.sub(replace, text)

    return mask


_mask_ipv4, _mask_ipv6 = _masker(IPV4, None), _masker(IPV6, _ipv6)


def _mask_ip(text: str, token: str, counts: Counter, kind: str) -> str:
    return _mask_ipv6(_mask_ipv4(text, token, counts, kind), token, counts, kind)


# kind -> (the switch, the token setting, the masker), in the order they run
KINDS = {
    "email": ("mask_emails", "email_token", _masker(EMAIL, None)),  # before URLs: an address is no link
    "url": ("mask_urls", "url_token", _masker(URL, None)),
    "iban": ("mask_ibans", "iban_token", _mask_iban),
    "credit_card": ("mask_credit_cards", "credit_card_token", _masker(CARD, _card)),
    "ip": ("mask_ips", "ip_token", _mask_ip),
    "phone": ("mask_phones", "phone_token", _masker(PHONE, _phone)),
}


def mask_personal_data(text: str, cfg: CleanSection, counts: Counter | None = None) -> str:
    """Replace each switched-on kind of personal data by its token, counting replacements per kind."""
    counts = counts if counts is not None else Counter()
    for kind, (switch, token, mask) in KINDS.items():
        if getattr(cfg, switch):
            text = mask(text, getattr(cfg, token), counts, kind)
    return text
