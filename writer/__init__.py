"""The shop: an ordinary transactional application on Postgres (the CQRS write side).

``writer.commands`` are its commands, ``python -m writer`` migrates, seeds and
loads it; docs/writer.md describes all of it.
"""
