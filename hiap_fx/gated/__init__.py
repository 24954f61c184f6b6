"""gated"""
