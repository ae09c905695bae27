"""What the program achieves, computed from its records: per stay (attendance, treatment hours against the ASAM
minimum, drug screens, symptom scales, craving, goals, aftercare linkage) and per program and period (census,
retention, completion, rates), as JSON, CSV, FHIR Measure/MeasureReport and charts. Pure: plain data in, plain data
out; iop/outcomes.py reads the records and decides which stays a client may count.
"""
