"""Secure computation: process sessions, input sharing, training, scoring.

Correlated randomness (Beaver triples, truncation wraps) comes from CrypTen's TTP
provider: a dealer run as its own process that must not collude with any party.
CrypTen's TFP provider, where party 0 generates everyone's triples and can therefore
read every product, is available only as the explicitly insecure ``insecure-tfp``.
"""
