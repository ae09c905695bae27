"""The IOP records: marshmallow schemas and the /iop blueprint (thin views)."""
