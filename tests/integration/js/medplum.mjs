// What an application built on Medplum's client (@medplum/core MedplumClient) does with this server, through the
// library's own calls, with an access token it was given (no Medplum login): create, read, update, JSON Patch, page
// through a search, create if none exists, post a transaction, delete, and a Bulk Data export it polls to the end
// and whose NDJSON files it downloads.
//   node medplum.mjs <server root URL>    (the FHIR base is <root>/fhir; the bearer token in FHIR_TOKEN)
// Prints one JSON object of what the server answered; on any failure prints the error and exits 1.
import { randomUUID } from 'node:crypto';
import { MedplumClient, OperationOutcomeError } from '@medplum/core';

const MRN = 'urn:oid:2.16.840.1.113883.19.5';
const LOINC = 'http://loinc.org';

const [baseUrl] = process.argv.slice(2);
// cacheTime 0: every read goes to the server, so what the script reports is what the server answered.
const medplum = new MedplumClient({ baseUrl, fhirUrlPath: 'fhir', fetch, cacheTime: 0 });
medplum.setAccessToken(process.env.FHIR_TOKEN);
const run = randomUUID().replaceAll('-', '').slice(0, 12);

function patient(family, mrn, extra = {}) {
  return {
    resourceType: 'Patient',
    identifier: [{ system: MRN, value: mrn }],
    name: [{ family, given: ['Sam'] }],
    birthDate: '1985-02-03',
    ...extra,
  };
}

/** Calls `request`, which the server must refuse; the OperationOutcome issue Medplum's error carries. */
async function refused(request) {
  try {
    await request();
  } catch (error) {
    if (!(error instanceof OperationOutcomeError)) throw error;
    const issue = error.outcome.issue?.[0] ?? {};
    return { code: issue.code ?? null, diagnostics: issue.diagnostics ?? null };
  }
  throw new Error('the server answered a request it should have refused');
}

async function main() {
  const result = { run };

  const family = `Plum${run}`;
  const created = await medplum.createResource(patient(family, `MRN-${run}`));
  const read = await medplum.readResource('Patient', created.id);
  const updated = await medplum.updateResource({ ...read, gender: 'male' });
  const patched = await medplum.patchResource('Patient', created.id, [
    { op: 'test', path: '/meta/versionId', value: '2' },
    { op: 'replace', path: '/birthDate', value: '1986-03-04' },
    { op: 'add', path: '/telecom', value: [{ system: 'phone', value: '555-0100', use: 'home' }] },
  ]);
  const reread = await medplum.readResource('Patient', created.id);
  result.crud = {
    id: created.id,
    versions: [created, read, updated, patched, reread].map((r) => r.meta.versionId),
    readFamily: read.name[0].family,
    updatedGender: updated.gender,
    patched: { birthDate: reread.birthDate, gender: reread.gender, telecom: reread.telecom },
    stalePatch: await refused(() =>
      medplum.patchResource('Patient', created.id, [{ op: 'test', path: '/meta/versionId', value: '1' }]),
    ),
  };

  // Seven matches: one page of three from searchResources, then every page through searchResourcePages.
  const pagedFamily = `Pages${run}`;
  const pagedIds = [];
  for (let n = 0; n < 7; n++) {
    const body = patient(pagedFamily, `MRN-${run}-${n}`, { birthDate: `19${70 + n}-06-01` });
    pagedIds.push((await medplum.createResource(body)).id);
  }
  const firstPage = await medplum.searchResources('Patient', { family: pagedFamily, _count: 3, _sort: 'birthdate' });
  const pages = [];
  for await (const page of medplum.searchResourcePages('Patient', { family: pagedFamily, _count: 3 })) {
    pages.push(page.map((p) => p.id));
  }
  result.paging = {
    family: pagedFamily,
    created: pagedIds,
    firstPage: firstPage.map((p) => p.id),
    firstPageHasNext: (firstPage.bundle.link ?? []).some((l) => l.relation === 'next'),
    pageSizes: pages.map((p) => p.length),
    seen: pages.flat(),
  };

  // Create-if-none-exists twice with the same identifier: the second returns the first.
  const conditionalMrn = `MRN-${run}-conditional`;
  const query = `identifier=${MRN}|${conditionalMrn}`;
  const once = await medplum.createResourceIfNoneExist(patient(`Cond${run}`, conditionalMrn), query);
  const twice = await medplum.createResourceIfNoneExist(patient(`Cond${run}`, conditionalMrn), query);
  result.conditional = { identifier: `${MRN}|${conditionalMrn}`, ids: [once.id, twice.id] };

  // A transaction through executeBatch: a Patient, and an Observation referring to it by its urn:uuid.
  const patientUrn = `urn:uuid:${randomUUID()}`;
  const transaction = await medplum.executeBatch({
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
          code: { coding: [{ system: LOINC, code: '72109-2', display: 'AUDIT-C' }] },
          subject: { reference: patientUrn },
          valueInteger: 4,
        },
        request: { method: 'POST', url: 'Observation' },
      },
    ],
  });
  result.transaction = {
    type: transaction.type,
    statuses: transaction.entry.map((e) => e.response.status),
    locations: transaction.entry.map((e) => e.response.location),
  };

  await medplum.deleteResource('Patient', created.id);
  result.delete = { id: created.id, readAfter: await refused(() => medplum.readResource('Patient', created.id)) };

  // Bulk Data export: Medplum POSTs $export with no body, polls the status URL until the manifest, then each file.
  const manifest = await medplum.bulkExport('', 'Patient,Observation', undefined, {
    pollStatusOnAccepted: true,
    pollStatusPeriod: 200,
  });
  const files = [];
  for (const output of manifest.output ?? []) {
    const ndjson = await (await medplum.download(output.url)).text();
    const lines = ndjson.split('\n').filter((line) => line !== '');
    const resources = lines.map((line) => JSON.parse(line));
    files.push({
      type: output.type,
      count: output.count ?? null,
      lines: lines.length,
      types: [...new Set(resources.map((r) => r.resourceType))],
      ids: resources.map((r) => r.id),
    });
  }
  result.export = {
    transactionTime: manifest.transactionTime ?? null,
    requiresAccessToken: manifest.requiresAccessToken ?? null,
    request: manifest.request ?? null,
    errors: manifest.error ?? [],
    files,
  };

  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch((error) => {
  const outcome = error instanceof OperationOutcomeError ? ` ${JSON.stringify(error.outcome)}` : '';
  process.stderr.write(`${error.stack ?? error}${outcome}\n`);
  process.exit(1);
});
