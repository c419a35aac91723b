"""Agents propose experiments; they never execute anything."""
