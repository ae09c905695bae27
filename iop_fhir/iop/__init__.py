"""The IOP records (/iop): marshmallow schemas, the /iop blueprints (thin views) and the record services."""
