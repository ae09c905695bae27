import sys

from iop_fhir.openapi import main

sys.exit(main())
