// What an application built on fhir-kit-client does with this server, through the library's own calls: read the
// CapabilityStatement, create, read, update, page through a search, create conditionally, post a transaction,
// delete, read the deleted resource, count, read history, and call $validate.
//   node fhir-kit-client.mjs <FHIR base URL>    (the bearer token in the environment variable FHIR_TOKEN)
// Prints one JSON object of what the server answered; on any failure prints the error and exits 1.
import { randomUUID } from 'node:crypto';
import { Client } from 'fhir-kit-client';

const MRN = 'urn:oid:2.16.840.1.113883.19.5';
const LOINC = 'http://loinc.org';

const [baseUrl] = process.argv.slice(2);
const client = new Client({ baseUrl, customHeaders: { Authorization: `Bearer ${process.env.FHIR_TOKEN}` } });
const run = randomUUID().replaceAll('-', '').slice(0, 12);
const status = (answer) => Client.httpFor(answer).response?.status;

function patient(family, mrn, extra = {}) {
  return {
    resourceType: 'Patient',
    identifier: [{ system: MRN, value: mrn }],
    name: [{ family, given: ['Alex'] }],
    birthDate: '1990-04-01',
    ...extra,
  };
}

/** Calls `request`, which the server must refuse; the HTTP status and OperationOutcome the library surfaces. */
async function refused(request) {
  try {
    await request();
  } catch (error) {
    if (error.response === undefined) throw error;
    return { status: error.response.status, issue: error.response.data?.issue?.[0] ?? null };
  }
  throw new Error('the server answered a request it should have refused');
}

async function main() {
  const result = { run };

  const capability = await client.capabilityStatement();
  const patientRest = capability.rest[0].resource.find((r) => r.type === 'Patient');
  result.capability = {
    resourceType: capability.resourceType,
    fhirVersion: capability.fhirVersion,
    patientInteractions: patientRest.interaction.map((i) => i.code).sort(),
  };

  const family = `Kit${run}`;
  const created = await client.create({ resourceType: 'Patient', body: patient(family, `MRN-${run}`) });
  const read = await client.read({ resourceType: 'Patient', id: created.id });
  const updated = await client.update({
    resourceType: 'Patient',
    id: created.id,
    body: { ...read, gender: 'female' },
  });
  const first = await client.vread({ resourceType: 'Patient', id: created.id, version: '1' });
  result.crud = {
    id: created.id,
    createStatus: status(created),
    createdVersion: created.meta.versionId,
    readFamily: read.name[0].family,
    readVersion: read.meta.versionId,
    updateStatus: status(updated),
    updatedVersion: updated.meta.versionId,
    updatedGender: updated.gender,
    firstVersionGender: first.gender ?? null,
  };

  // Seven matches, three to a page: the client follows the server's next links until there are none.
  const pagedFamily = `Paged${run}`;
  const pagedIds = [];
  for (let n = 0; n < 7; n++) {
    const body = patient(pagedFamily, `MRN-${run}-${n}`, { birthDate: `19${60 + n}-01-01` });
    pagedIds.push((await client.create({ resourceType: 'Patient', body })).id);
  }
  const pageSizes = [];
  const seen = [];
  let page = await client.search({ resourceType: 'Patient', searchParams: { family: pagedFamily, _count: 3 } });
  while (page !== undefined) {
    const entries = page.entry ?? [];
    pageSizes.push(entries.length);
    seen.push(...entries.map((e) => e.resource.id));
    page = await client.nextPage({ bundle: page });
  }
  const counted = await client.resourceSearch({
    resourceType: 'Patient',
    searchParams: { family: pagedFamily, _summary: 'count' },
  });
  result.paging = {
    family: pagedFamily,
    created: pagedIds,
    pageSizes,
    seen,
    countTotal: counted.total,
    countEntries: (counted.entry ?? []).length,
  };

  // The same conditional create twice: the second finds the first instead of making another Patient.
  const conditionalMrn = `MRN-${run}-conditional`;
  const ifNoneExist = { headers: { 'If-None-Exist': `identifier=${MRN}|${conditionalMrn}` } };
  const once = await client.create({
    resourceType: 'Patient',
    body: patient(`Cond${run}`, conditionalMrn),
    options: ifNoneExist,
  });
  const twice = await client.create({
    resourceType: 'Patient',
    body: patient(`Cond${run}`, conditionalMrn),
    options: ifNoneExist,
  });
  result.conditional = {
    identifier: `${MRN}|${conditionalMrn}`,
    ids: [once.id, twice.id],
    statuses: [status(once), status(twice)],
  };

  // A transaction: a Patient and an Observation that refers to it by the Patient's temporary urn:uuid.
  const patientUrn = `urn:uuid:${randomUUID()}`;
  const transaction = await client.transaction({
    body: {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          fullUrl: patientUrn,
          resource: patient(`Tx${run}`, `MRN-${run}-tx`),
          request: { method: 'POST', url: 'Patient' },
        },
        {
          resource: {
            resourceType: 'Observation',
            status: 'final',
            code: { coding: [{ system: LOINC, code: '44261-6', display: 'PHQ-9 total score' }] },
            subject: { reference: patientUrn },
            valueInteger: 9,
          },
          request: { method: 'POST', url: 'Observation' },
        },
      ],
    },
  });
  result.transaction = {
    type: transaction.type,
    statuses: transaction.entry.map((e) => e.response.status),
    locations: transaction.entry.map((e) => e.response.location),
  };

  // Delete, then read: the library surfaces the server's 410 Gone as an error carrying the status.
  const deleted = await client.delete({ resourceType: 'Patient', id: created.id });
  result.delete = {
    id: created.id,
    status: status(deleted),
    readAfter: await refused(() => client.read({ resourceType: 'Patient', id: created.id })),
  };

  const history = await client.history({ resourceType: 'Patient', id: created.id });
  const typeHistory = await client.typeHistory({ resourceType: 'Patient' });
  result.history = {
    type: history.type,
    instance: history.entry.map((e) => [e.request.method, e.resource?.meta?.versionId ?? null]),
    typeHasDeletion: typeHistory.entry.some(
      (e) => e.request.method === 'DELETE' && e.request.url.includes(`Patient/${created.id}`),
    ),
    typeMatchesPaged: pagedIds.every((id) => typeHistory.entry.some((e) => e.resource?.id === id)),
  };

  const valid = await client.operation({
    name: '$validate',
    resourceType: 'Patient',
    input: patient(`Valid${run}`, `MRN-${run}-valid`),
  });
  const invalid = await client.operation({
    name: 'validate',
    resourceType: 'Patient',
    input: patient(`Invalid${run}`, `MRN-${run}-invalid`, { gender: 'unknown-gender' }),
  });
  const severities = (outcome) => outcome.issue.map((i) => i.severity);
  result.validate = {
    validType: valid.resourceType,
    validSeverities: severities(valid),
    invalidStatus: status(invalid),
    invalidErrors: invalid.issue.filter((i) => i.severity === 'error').map((i) => i.expression ?? []),
  };

  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch((error) => {
  const answer = error.response === undefined ? '' : ` ${JSON.stringify(error.response.data)}`;
  process.stderr.write(`${error.stack ?? error}${answer}\n`);
  process.exit(1);
});
