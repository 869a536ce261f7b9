// Candidate intentions (docs/semantics.md#rollout-candidate): the entry as `consul config write`
// takes it, turned into the intentions the agent would serve, compiled against the live inputs,
// and the file form re-read on change with the last good candidate kept.
import t from 'tap'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { FastifyBaseLogger } from 'fastify'
import { Candidate, CandidateError, candidateIntentions, compileCandidate } from '../lib/candidate'
import { decide } from '../lib/intentions/policy'
import { RecordingLogger } from './helpers/agent-fixtures'
import { ixn } from './helpers/intentions'

const caller = (service: string): { partition: string, namespace: string, service: string } => ({ partition: '', namespace: 'default', service })
const req = (method: string, path: string): { method: string, path: string, url: string, rawHeaders: string[] } => ({ method, path, url: path, rawHeaders: [] })

t.test('an entry becomes the intentions the match endpoint would list', async (t) => {
  const { destination, intentions } = candidateIntentions({
    kind: 'service-intentions',
    name: 'api',
    Sources: [
      { Name: 'web', permissions: [{ action: 'allow', http: { path_prefix: '/v1', methods: ['get'] } }] },
      { Name: '*', Action: 'deny', Description: 'the rest' },
      { name: '*', namespace: '*', action: 'allow' }
    ]
  }, 'api')
  t.equal(destination, 'api')
  t.same(intentions.map((i) => [i.SourceNS, i.SourceName, i.Precedence, i.Action ?? null]),
    [['default', 'web', 9, null], ['default', '*', 8, 'deny'], ['*', '*', 7, 'allow']])
  t.same(intentions[0]?.Permissions, [{ Action: 'allow', HTTP: { PathPrefix: '/v1', Methods: ['GET'] } }], 'keys canonical, methods upper-cased')
  t.equal(intentions[0]?.DestinationName, 'api')
  const wild = candidateIntentions({ Kind: 'service-intentions', Name: '*', Sources: [{ Name: 'web', Action: 'allow' }, { Name: '*', Action: 'deny' }] }, 'api')
  t.same(wild.intentions.map((i) => i.Precedence), [6, 5], 'a wildcard destination')
  const jwt = candidateIntentions({ Kind: 'service-intentions', Name: 'api', JWT: { Providers: [{ Name: 'okta' }] }, Meta: { Team_Name: 'x' }, Sources: [{ Name: 'web', Action: 'allow' }] }, 'api')
  t.same(jwt.intentions[0]?.JWT, { Providers: [{ Name: 'okta' }] }, 'the entry JWT applies to every source; Meta keys kept as written')
})

t.test('a bad entry is refused with what to fix', async (t) => {
  const entry = (sources: unknown, extra: Record<string, unknown> = {}): unknown => ({ Kind: 'service-intentions', Name: 'api', Sources: sources, ...extra })
  const cases: Array<[unknown, RegExp]> = [
    [[], /must be a JSON object/],
    [{ Kind: 'service-defaults', Name: 'api' }, /Kind must be "service-intentions"/],
    [entry([{ Name: 'web', Action: 'allow' }], { Name: 'billing' }), /Name must be this service \("api"\) or "\*", got "billing"/],
    [entry([{ Name: 'web', Action: 'allow' }], { Name: 5 }), /entry.Name must be a string/],
    [entry([]), /Sources must be a non-empty array/],
    [entry(undefined), /Sources must be a non-empty array/],
    [entry([{ Name: 'web', Action: 'allow' }], { Colour: 'red' }), /unknown key "Colour"/],
    [entry([{ Name: 'web', Action: 'allow' }], { CreateIndex: 1, LegacyID: 'x' }), /LegacyID is not a field of a service-intentions entry/],
    [entry([{ Name: 'web', Action: 'allow', Kind: 'x' }]), /Sources\[0\].Kind is not a field of a source/],
    [entry([{ Name: 'web', Action: 'allow', name: 'web' }]), /repeats Name/],
    [entry(['web']), /Sources\[0\] must be an object/],
    [entry([{ Action: 'allow' }]), /Sources\[0\].Name is required/],
    [entry([{ Name: 'we*', Action: 'allow' }]), /cannot be used with partial values/],
    [entry([{ Name: 'web', Namespace: 'n*', Action: 'allow' }]), /cannot be used with partial values/],
    [entry([{ Name: 'web', Namespace: '*', Action: 'allow' }]), /exact name cannot follow a wildcard namespace/],
    [entry([{ Name: 'web', Permissions: {} }]), /Permissions must be an array/],
    [entry([{ Name: 'web', Action: 'allow', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }] }]), /Action must be omitted/],
    [entry([{ Name: 'web', Action: 'ALLOW' }]), /Action must be set to 'allow' or 'deny'/],
    [entry([{ Name: 'web' }]), /Action must be set/],
    [entry([{ Name: 'web', Action: 'allow' }, { Name: 'web', Action: 'deny' }]), /Sources\[1\] defines "web" more than once/]
  ]
  for (const [value, message] of cases) {
    t.throws(() => candidateIntentions(value, 'api'), message, JSON.stringify(value))
    try { candidateIntentions(value, 'api') } catch (err) { t.ok(err instanceof CandidateError) }
  }
  // Permissions are checked as Consul checks a written entry (the agent's answers, only for their shape).
  t.throws(() => candidateIntentions({ Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: 'x' }] }] }, 'api'), /Sources\[0\].Permissions\[0\].HTTP must be an object/)
  const written: Array<[unknown, RegExp]> = [
    [{ Action: 'allow' }, /Sources\[0\].Permissions\[0\].HTTP is required/],
    [{ Action: 'allow', HTTP: {} }, /must set at least one of PathExact, PathPrefix, PathRegex, Methods, Header/],
    [{ Action: 'allow', HTTP: { PathPrefix: 'v1' } }, /PathPrefix must start with "\/"/],
    [{ Action: 'allow', HTTP: { Methods: ['FETCH'] } }, /"FETCH" is not one of/]
  ]
  for (const [perm, message] of written) {
    t.throws(() => candidateIntentions(entry([{ Name: 'web', Permissions: [perm] }]), 'api'), message, JSON.stringify(perm))
  }
  t.throws(() => candidateIntentions(entry([{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }] }], { Name: '*' }), 'api'),
    /Permissions cannot be specified on intentions with wildcarded destinations/)
  t.throws(() => candidateIntentions(entry([{ Name: 'web', Peer: 'east', Partition: 'p', Action: 'allow' }]), 'api'), /Peer and Partition cannot both be set/)
  t.throws(() => candidateIntentions(entry([{ Name: 'web', Type: 'bogus', Action: 'allow' }]), 'api'), /Type must be set to 'consul'/)
  t.equal(candidateIntentions(entry([{ Name: 'web', Type: 'consul', Action: 'allow' }]), 'api').intentions.length, 1)
  t.throws(() => candidateIntentions(entry([{ Name: 'web', Action: 'allow' }], { JWT: 'okta' }), 'api'), /JWT/, 'the rest is shape-checked as the agent\'s answers are')
  t.throws(() => candidateIntentions({ Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Permissions: ['x'] }] }, 'api'), /Sources\[0\]/)
  t.throws(() => candidateIntentions({ Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { Methods: ['get', 5] } }] }] }, 'api'), /Methods/)
})

t.test('compiled with the live list: the candidate replaces its own entry only', async (t) => {
  const live = {
    intentions: [ixn('web', 'api', 9, 'deny'), ixn('*', '*', 5, 'allow'), ixn('billing', '*', 6, 'deny')],
    defaultAllow: false,
    protocol: 'http'
  }
  const candidate = candidateIntentions({ Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/ok' } }] }] }, 'api')
  const policy = compileCandidate('api', candidate, live)
  t.equal(decide(policy, caller('web'), req('GET', '/ok/1')).allow, true, 'the live web deny is replaced')
  t.equal(decide(policy, caller('web'), req('GET', '/no')).reason, 'intention default/web => default/api (precedence 9): no permission matched, default policy (deny)')
  t.equal(decide(policy, caller('billing'), req('GET', '/ok')).allow, false, 'the wildcard-destination entry stays')
  t.equal(decide(policy, caller('cron'), req('GET', '/ok')).allow, true)
  t.throws(() => compileCandidate('api', candidate, { ...live, protocol: 'tcp' }),
    { message: 'service "api" has protocol "tcp", which is incompatible with L7 intentions permissions' }, 'refused as Consul refuses it on a tcp service')
  const l4 = candidateIntentions({ Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'allow' }] }, 'api')
  t.equal(decide(compileCandidate('api', l4, { ...live, protocol: 'tcp' }), caller('web'), req('GET', '/ok/1')).allow, true, 'L4 on tcp is fine')
  t.throws(() => candidateIntentions({ Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathRegex: '(' } }] }] }, 'api'),
    /PathRegex "\(" is not a valid RE2 regular expression/, 'a bad regex is refused with the entry')
  t.throws(() => compileCandidate('api', { destination: 'api', intentions: [{ ...ixn('web', 'api', 9, 'allow'), Action: undefined, Permissions: [{ Action: 'allow', HTTP: { PathRegex: '(' } }] }] as never }, live),
    { code: 'FST_CONSUL_NATIVE_INVALID_INTENTIONS' }, 'and by the compiler')
})

t.test('a file candidate is re-read on change; a bad file keeps the last good one', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'candidate-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const file = join(dir, 'api.json')
  // The watcher does not hold the process open (a server does, in real use).
  const alive = setInterval(() => undefined, 1000)
  t.teardown(() => clearInterval(alive))
  const good = { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'allow' }] }
  await writeFile(file, JSON.stringify(good))
  const log = new RecordingLogger()
  let changes = 0
  let changed: () => void = () => undefined
  const candidate = new Candidate('api', file, log as unknown as FastifyBaseLogger,
    () => ({ intentions: [], defaultAllow: false, protocol: 'http' }), () => { changes++; changed() })
  const nextChange = async (): Promise<void> => await new Promise((resolve) => { changed = resolve })
  t.teardown(() => candidate.stop())
  await candidate.start()
  t.equal(changes, 1)
  t.match(candidate.status(), { source: file, loaded: true, count: 1, lastError: null, disagreements: 0 })
  t.match(log.at('info')[0]?.obj, { consulNative: { event: 'candidate-loaded', source: file, count: 1 } })
  const first = candidate.policy
  t.equal(decide(first as NonNullable<typeof first>, caller('web'), req('GET', '/')).allow, true)

  let next = nextChange()
  await writeFile(file, '{ not json')
  await next
  t.equal(candidate.policy, first, 'the last good candidate stays')
  t.match(candidate.status(), { loaded: true, lastError: /is not JSON/ })
  t.match(log.at('error')[0], { obj: { consulNative: { event: 'candidate-rejected', source: file } }, msg: /last good candidate stays in use/ })

  next = nextChange()
  await writeFile(file, JSON.stringify({ ...good, Sources: [{ Name: 'web', Action: 'deny' }, { Name: 'cron', Action: 'allow' }] }))
  await next
  t.match(candidate.status(), { loaded: true, count: 2, lastError: null })
  t.equal(decide(candidate.policy as NonNullable<typeof first>, caller('web'), req('GET', '/')).allow, false)
  t.equal(log.at('info').length, 2, 'recovery is logged')

  const before = candidate.policy
  candidate.relive()
  t.not(candidate.policy, before, 'recompiled against new live inputs')
  t.equal(log.at('info').length, 2, 'a recompile of a good candidate is not logged again')

  next = nextChange()
  await rm(file)
  await next
  t.match(candidate.status(), { loaded: true, lastError: /cannot read/ })
  await candidate.settled()
})

t.test('inline and never-good candidates', async (t) => {
  const log = new RecordingLogger()
  const live = (): { intentions: never[], defaultAllow: boolean, protocol: string } => ({ intentions: [], defaultAllow: true, protocol: 'tcp' })
  const inline = new Candidate('api', { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'deny' }] }, log as unknown as FastifyBaseLogger, live, () => undefined)
  await inline.start()
  t.match(inline.status(), { source: 'inline', loaded: true, count: 1 })
  inline.stop()

  const bad = new Candidate('api', { Kind: 'service-intentions', Name: 'other', Sources: [] }, log as unknown as FastifyBaseLogger, live, () => undefined)
  await bad.start()
  t.equal(bad.policy, null)
  t.match(bad.status(), { loaded: false, count: 0, lastError: /Name must be this service/ })
  t.match(log.at('error')[0]?.msg, /no candidate decisions until it is fixed/)
  bad.relive()
  t.equal(bad.policy, null, 'nothing to recompile')

  const missing = new Candidate('api', '/nonexistent/candidate.json', log as unknown as FastifyBaseLogger, live, () => undefined)
  await missing.start()
  t.match(missing.status(), { loaded: false, lastError: /cannot read \/nonexistent\/candidate.json/ })
  missing.stop()
  missing.stop()
})
