"""Shipped data: the remedies knowledge base and measured hardware catalogs.

Installed as ``opaudit.catalogs`` so that ``importlib.resources`` finds it in
editable and regular installs alike.
"""
