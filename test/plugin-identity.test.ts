// Who is calling: identities come only from certificates that verify against the current roots
// and trust domain, over real TLS connections.
import t from 'tap'
import tls from 'node:tls'
import { DevCertificateAuthority } from '../lib/dev-agent/ca'
import { serviceSpiffeId } from '../lib/spiffe'
import { get, leafFor, mtlsClient, rootPems, setIntentions, startAgent, startService } from './helpers/mesh'

t.test('a client holding a leaf for web is seen as web', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent)
  const client = mtlsClient(t, await leafFor(agent, 'web'))
  const res = await get(client, `${svc.origin}/whoami`)
  t.equal(res.status, 200)
  t.equal(res.body.source.service, 'web')
  t.equal(res.body.source.namespace, 'default')
  t.equal(res.body.source.partition, 'default')
  t.equal(res.body.source.datacenter, 'dc1')
  t.equal(res.body.source.trustDomain, agent.trustDomain)
  t.equal(res.body.source.uri, `spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/web`)
  t.equal(res.body.decision.allow, true)
})

t.test('connecting by IP (no SNI) and by name (SNI) both serve the current leaf', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent)
  const creds = await leafFor(agent, 'web')
  for (const servername of [undefined, 'api.service.consul']) {
    const peer = await new Promise<tls.PeerCertificate>((resolve, reject) => {
      const socket = tls.connect({ host: '127.0.0.1', port: svc.port, ...creds, ...(servername === undefined ? {} : { servername }), checkServerIdentity: () => undefined }, () => {
        resolve(socket.getPeerCertificate())
        socket.end()
      })
      socket.on('error', reject)
    })
    t.match(peer.subjectaltname, 'svc/api', `server presents the api leaf (servername ${String(servername)})`)
  }
})

t.test('certificates that are not a verified local service identity get 401', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent)
  const ca = await rootPems(agent)
  const td = agent.trustDomain

  const other = await DevCertificateAuthority.create()
  const foreignCa = await other.signLeaf('web')
  const foreignTd = await agent.ca.issueCertificate({ uris: [serviceSpiffeId('other-td.consul', { datacenter: 'dc1', service: 'web' })] })
  const agentId = await agent.ca.issueCertificate({ uris: [`spiffe://${td}/agent/client/dc/dc1/id/node1`] })
  const twoUris = await agent.ca.issueCertificate({ uris: [serviceSpiffeId(td, { datacenter: 'dc1', service: 'web' }), serviceSpiffeId(td, { datacenter: 'dc1', service: 'ops' })] })
  const noUri = await agent.ca.issueCertificate({ dnsNames: ['web.example'] })
  const expired = await agent.ca.issueCertificate({
    uris: [serviceSpiffeId(td, { datacenter: 'dc1', service: 'web' })],
    notBefore: new Date(Date.now() - 7200_000),
    notAfter: new Date(Date.now() - 3600_000)
  })
  const serverOnly = await agent.ca.issueCertificate({ uris: [serviceSpiffeId(td, { datacenter: 'dc1', service: 'web' })], extKeyUsage: ['serverAuth'] })

  const cases: Array<[string, { key?: string, cert?: string }]> = [
    ['a certificate from another CA', { key: foreignCa.privateKeyPem, cert: foreignCa.certPem }],
    ['another trust domain', { key: foreignTd.privateKeyPem, cert: foreignTd.certPem }],
    ['an agent SPIFFE ID', { key: agentId.privateKeyPem, cert: agentId.certPem }],
    ['two URI SANs', { key: twoUris.privateKeyPem, cert: twoUris.certPem }],
    ['no URI SAN', { key: noUri.privateKeyPem, cert: noUri.certPem }],
    ['an expired certificate', { key: expired.privateKeyPem, cert: expired.certPem }],
    ['a certificate without clientAuth', { key: serverOnly.privateKeyPem, cert: serverOnly.certPem }],
    ['no certificate at all', {}]
  ]
  for (const [name, creds] of cases) {
    const client = mtlsClient(t, { ...creds, ca })
    const res = await get(client, `${svc.origin}/`)
    t.equal(res.status, 401, `${name} → 401`)
    t.equal(res.body.code, 'FST_CONSUL_NATIVE_UNAUTHENTICATED', name)
    t.notMatch(JSON.stringify(res.body), /spiffe|web/, `${name}: the body names no identity`)
  }
})

t.test('TLS 1.3 resumption: no certificate stays unauthenticated, a certificate stays known', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent)
  const ca = await rootPems(agent)
  const creds = await leafFor(agent, 'web')

  for (const [name, withCert] of [['without a certificate', false], ['with a certificate', true]] as const) {
    let session: Buffer | undefined
    const results: Array<{ reused: boolean, status: string }> = []
    for (let i = 0; i < 2; i++) {
      const outcome = await new Promise<{ reused: boolean, status: string }>((resolve, reject) => {
        const socket = tls.connect({
          host: '127.0.0.1',
          port: svc.port,
          ca,
          ...(withCert ? { key: creds.key, cert: creds.cert } : {}),
          minVersion: 'TLSv1.3',
          session,
          checkServerIdentity: () => undefined
        })
        socket.on('session', (s: Buffer) => { session = s })
        socket.on('error', reject)
        socket.on('secureConnect', () => {
          socket.write('GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n')
        })
        let data = ''
        socket.on('data', (chunk: Buffer) => { data += chunk.toString() })
        socket.on('end', () => resolve({ reused: socket.isSessionReused(), status: data.slice(9, 12) }))
      })
      results.push(outcome)
    }
    t.equal(results[1]?.reused, true, `${name}: the second connection resumed the session`)
    t.same(results.map((r) => r.status), withCert ? ['200', '200'] : ['401', '401'], name)
  }
})

t.test('an L4 deny for the caller is enforced on every route, a 404 included', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await setIntentions(agent, 'api', [{ Name: 'billing', Action: 'deny' }])
  const svc = await startService(t, agent)
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  t.equal((await get(billing, `${svc.origin}/`)).status, 403)
  t.equal((await get(billing, `${svc.origin}/no-such-route`)).status, 403)
  const anonymous = mtlsClient(t, { ca: await rootPems(agent) })
  t.equal((await get(anonymous, `${svc.origin}/no-such-route`)).status, 401, 'an unauthenticated caller cannot tell a 404')
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/no-such-route`)).status, 404)
})
