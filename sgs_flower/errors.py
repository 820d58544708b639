"""Typed errors of the protocol and of input validation (a leaf module: no sgs_flower imports).

Every rejection names what was wrong and what to do, so that a Flower operator
reading a log line can tell a dropped client from a replay from a bad configuration.
The hierarchy lets the server catch :class:`ProtocolError` per client (that client is
excluded, the round goes on) while :class:`ThresholdError` ends the round cleanly.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by :mod:`sgs_flower.secagg`."""


class ConfigurationError(SecAggError, ValueError):
    """A protocol or quantization parameter is impossible or unsafe."""


class OverflowRiskError(ConfigurationError):
    """The modulus 2^b cannot hold the cohort's sum without wrap-around."""


class EncodingError(SecAggError, ValueError):
    """An update cannot be encoded (non-finite values, wrong shape, bad weight)."""


class ProtocolError(SecAggError):
    """A message is invalid for the receiver's current state; the sender is excluded."""


class StaleMessageError(ProtocolError):
    """Wrong protocol version, run, round or stage: a replayed or late message."""


class UnknownSenderError(ProtocolError):
    """The sender is not in the cohort, not a neighbour, or not who it claims to be."""


class MalformedMessageError(ProtocolError):
    """Undecodable bytes, a missing field, or a vector of the wrong length or dtype."""


class ShareDecryptionError(ProtocolError):
    """An encrypted share failed authentication: it was tampered with or mis-routed."""


class InconsistentRequestError(ProtocolError):
    """The server's unmask request contradicts what the client saw (a possible attack)."""


class PolicyError(ProtocolError):
    """The server asked for less protection than this site's policy requires (a plain
    train message, a small cohort, a sparse graph, a low threshold, an unknown identity,
    too little noise, a spent privacy budget, a second contribution). The site refuses
    and drops out of the round; the message names the rule, never a value of the site's."""


class ModelIntegrityError(ProtocolError):
    """Model-confidential mode: a masked model failed the sites' MAC (changed words, a
    false survivor list, spec, layout or round, another key) or is older than one this
    site already unmasked; the site refuses to train on it."""


class ModelKeyError(PolicyError):
    """Model-confidential mode: a model-key message this site must refuse (a key from an
    identity off its roster, a second key for the same roster, an envelope for another
    site, a round under a key it does not hold)."""


class SignatureError(ProtocolError):
    """A signature did not verify under the identity key it claims: a forged or
    tampered advertisement or consistency signature."""


class FailedProofError(ProtocolError):
    """Input validation (issue 31): a site's bound proof, signed by its identity key for
    the round's challenge, is malformed or does not verify; the site is left out like a
    dropout and its signed proof is the evidence every honest site checks."""


class ThresholdError(SecAggError):
    """Too few clients survive to reconstruct masks, or the cohort is too small; the
    round is aborted with no aggregate and the global model stays as it was."""


class UnprovenInputError(ThresholdError):
    """Input validation (issue 31): a survivor's masked input is in the sum but it sent
    no proof (or none signed by its identity) for the round's challenge, so it can be
    neither checked nor excluded with evidence; the round is aborted with no aggregate."""


class ReconstructionError(SecAggError):
    """Shares did not reconstruct the committed secret (a client sent a bad share)."""


class InconsistentAggregateError(SecAggError):
    """The unmasked sum fails its integrity check: clients did not all mask under the
    same context (for example the server sent them different global models)."""
