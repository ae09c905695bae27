"""The IOP records (/iop): marshmallow schemas, the /iop blueprints (thin views), the record services, and the
discharge summary rendered for people without FHIR (HTML, PDF)."""
