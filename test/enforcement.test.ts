// The preParsing backstop, the limiter key of unauthenticated callers and the hook's order of
// decisions for an Upgrade, on their own.
import t from 'tap'
import { addressClass, backstopHook, enforceHook } from '../lib/enforcement'
import type { Enforcer } from '../lib/enforcement'
import { DeniedError } from '../lib/errors'
import { SERVICE_POLICY } from '../lib/route-policy'
import type { RoutePolicies, RoutePolicy } from '../lib/route-policy'

t.test('a request without a recorded decision is denied and logged; one with a decision passes', async (t) => {
  const logged: unknown[] = []
  const headersSet: unknown[] = []
  const reply = { raw: { setHeader: (...args: unknown[]) => headersSet.push(args) } }
  const log = { debug: () => {}, info: () => {}, warn: () => {}, error: (obj: object, msg: string) => logged.push({ ...obj, msg }) }
  const backstop = backstopHook(log, 'reqId')
  const request = {
    consulDecision: null as unknown,
    method: 'POST',
    url: '/x',
    id: 'req-1',
    is404: false,
    routeOptions: { url: '/x' },
    raw: { httpVersionMajor: 1, headers: { 'content-length': '5' }, socket: {} }
  }
  let outcome: [Error | null, unknown] | undefined
  backstop(request as never, reply as never, 'payload', (err, payload) => { outcome = [err, payload] })
  t.match(outcome?.[0], { code: 'FST_CONSUL_NATIVE_DENIED', statusCode: 403 })
  t.match(logged, [{ reqId: 'req-1', consulNative: { event: 'no-decision', route: '/x', method: 'POST', path: '/x' } }])
  t.same(headersSet, [['connection', 'close']], 'the body that may follow is not read: the connection closes after the answer')
  backstop({ ...request, is404: true } as never, reply as never, 'payload', () => {})
  t.match(logged[1], { consulNative: { route: '(not found)' } }, 'a 404 is named by the not-found marker')

  // The decorations read null before the decision; undefined (a request object without them) is
  // refused all the same.
  const undecorated = { ...request, consulDecision: undefined }
  outcome = undefined
  backstop(undecorated as never, reply as never, 'payload', (err, payload) => { outcome = [err, payload] })
  t.match(outcome?.[0], { code: 'FST_CONSUL_NATIVE_DENIED' }, 'undefined is no decision either')

  const decided = { ...request, consulDecision: { allow: true, reason: 'x' } }
  backstop(decided as never, reply as never, 'payload', (err, payload) => { outcome = [err, payload] })
  t.same(outcome, [null, 'payload'])
  const shadowed = { ...request, consulDecision: { allow: false, reason: 'x', enforced: false } }
  backstop(shadowed as never, reply as never, 'payload', (err, payload) => { outcome = [err, payload] })
  t.same(outcome, [null, 'payload'], 'a shadowed denial is served, as shadow mode serves it')
  t.equal(logged.length, 3)
  const denied = { ...request, consulDecision: { allow: false, reason: 'x' } }
  backstop(denied as never, reply as never, 'payload', (err, payload) => { outcome = [err, payload] })
  t.match(outcome?.[0], { code: 'FST_CONSUL_NATIVE_DENIED' }, 'a recorded denial that reached body parsing is refused all the same')
  t.equal(logged.length, 4)
  t.match(logged[3], { consulNative: { event: 'no-decision' }, msg: /the access decision refused reached body parsing/ })
})

t.test('unauthenticated callers are told apart by the kind of network they call from (docs/semantics.md#log-limits)', async (t) => {
  const cases: Array<[string | undefined, string]> = [
    ['127.0.0.1', 'loopback'], ['::ffff:127.0.0.9', 'loopback'], ['::1', 'loopback'],
    ['10.1.2.3', 'private'], ['172.16.0.1', 'private'], ['172.31.255.255', 'private'], ['192.168.1.1', 'private'],
    ['172.32.0.1', 'public'], ['172.15.0.1', 'public'], ['192.169.0.1', 'public'], ['8.8.8.8', 'public'],
    ['169.254.1.1', 'link-local'], ['fe80::1', 'link-local'], ['FEBF::1', 'link-local'],
    ['fd00::1', 'private'], ['fc00::2', 'private'], ['2001:db8::1', 'public'], [undefined, 'unknown']
  ]
  for (const [address, kind] of cases) t.equal(addressClass(address), kind, String(address))
})

t.test('an Upgrade to a route with its own setting: the route decides, then the service; a route that allows after all is not final', async (t) => {
  const override = Object.freeze({ exempt: false, override: null, enforcement: null }) as RoutePolicy
  const routes = { of: () => override } as unknown as RoutePolicies
  const run = async (own: boolean | Promise<boolean>, answers: (route: RoutePolicy) => Error | null): Promise<{ err: Error | undefined, asked: string[], tracked: unknown[] }> => {
    const asked: string[] = []
    const enforcer = {
      redecide: () => own,
      check: (_request: unknown, route: RoutePolicy) => { asked.push(route === SERVICE_POLICY ? 'service' : 'route'); return answers(route) }
    } as unknown as Enforcer
    const tracked: unknown[] = []
    const hook = enforceHook(enforcer, routes, { trackIfUpgrade: (_request: unknown, route: unknown, also: unknown) => { tracked.push([route, also]) } } as never)
    const request = { raw: { upgrade: true, rawHeaders: [], httpVersionMajor: 1, socket: { destroySoon: () => {} } } }
    const reply = { raw: { setHeader: () => {}, once: () => {} } }
    const err = await new Promise<Error | undefined>((resolve) => { hook.call(null as never, request as never, reply as never, resolve as never) })
    return { err, asked, tracked }
  }
  const serviceRefuses = (route: RoutePolicy): Error | null => route === SERVICE_POLICY ? new DeniedError() : null
  t.match(await run(true, serviceRefuses), { err: { code: 'FST_CONSUL_NATIVE_DENIED' }, asked: ['service'] }, 'the route allows (not counted): the service decides')
  t.match(await run(Promise.resolve(true), () => null), { err: undefined, asked: ['service'], tracked: [[SERVICE_POLICY, override]] },
    'also when the route\'s decision waits; allowed, it is rechecked with both (option recheckUpgrades)')
  t.match(await run(false, () => new DeniedError()), { err: { code: 'FST_CONSUL_NATIVE_DENIED' }, asked: ['route'] }, 'the route refuses: its refusal is the answer')
  t.match(await run(false, serviceRefuses), { err: { code: 'FST_CONSUL_NATIVE_DENIED' }, asked: ['route', 'service'] },
    'the route refused, then allows when asked again (an update in between): the service still decides')
})
