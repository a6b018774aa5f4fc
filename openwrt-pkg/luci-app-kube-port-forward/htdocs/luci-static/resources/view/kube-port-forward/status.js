'use strict';
'require view';
'require poll';
'require rpc';
'require dom';

const callStatus = rpc.declare({
	object: 'kube-port-forward',
	method: 'status'
});

const STATES = {
	forwarding: _('forwarding'),
	conflict: _('conflict'),
	invalid: _('invalid'),
	waiting: _('waiting'),
	refused: _('refused'),
	kernel: _('in the table')
};

const STATE_COLOURS = {
	forwarding: '#2e7d32',
	conflict: '#c62828',
	invalid: '#c62828',
	waiting: '#ef6c00',
	refused: '#c62828',
	kernel: '#616161'
};

// Text from the router or the cluster goes into the page as text nodes (in arrays: LuCI's E()
// reads a lone string as HTML), since anyone who may annotate a Service writes some of it.
function keyText(key) {
	return key ? '%s/%s/%d'.format(key.family, key.protocol, key.external_port) : '';
}

function endpoint(addr, port) {
	return (addr.indexOf(':') >= 0) ? '[%s]:%d'.format(addr, port) : '%s:%d'.format(addr, port);
}

function dash() {
	return E('em', {}, '–');
}

function ago(now, then) {
	if (then == null)
		return _('never');

	const seconds = Math.max(0, now - then);

	return _('%s ago (%s)').format(
		seconds ? '%t'.format(seconds) : _('0s'),
		new Date(then * 1000).toLocaleString());
}

// The daemon's line: ready, running but not ready (with /readyz's answer), or not running.
function daemonNode(st) {
	const d = st.daemon ?? {};
	let state, text;

	if (!d.running) {
		state = 'stopped';
		text = st.enabled
			? _('not running')
			: _('not running: disabled in Settings');
	}
	else if (d.ready) {
		state = 'ready';
		text = _('running (pid %d), ready').format(d.pid);
	}
	else {
		state = 'not-ready';
		text = _('running (pid %d), not ready: %s').format(d.pid,
			d.readyz ?? (d.health ? _('no answer') : _('health endpoint off, readiness unknown')));
	}

	return E('span', { 'id': 'kpf-daemon', 'data-state': state }, [
		E('strong', { 'style': 'color:%s'.format(state == 'ready' ? STATE_COLOURS.forwarding : STATE_COLOURS.conflict) }, [ text ]),
		d.started ? ' · ' + _('started %s').format(ago(st.now, d.started)) : ''
	]);
}

function upstreamText(up) {
	if (!up)
		return _('off');

	let text = _('IGD %s: %s').format(up.igd ?? _('(not found)'),
		up.reachable ? _('answering') : _('not answering (%s)').format(up.error ?? _('not asked yet')));

	if (up.external)
		text += '; ' + _('external address %s').format(up.external);

	if (up.internal)
		text += '; ' + _('maps to %s').format(up.internal);

	if (up.running === false)
		text += ' ' + _('(as last written: the daemon is not running)');

	return text;
}

function mappingText(m) {
	if (!m)
		return dash();

	return (m.code != null && m.reason)
		? '%s %d %s'.format(m.state, m.code, m.reason)
		: (m.state ?? _('unknown'));
}

function stateCell(state) {
	return E('td', { 'class': 'td kpf-state', 'data-title': _('State') },
		E('span', { 'style': 'color:%s;font-weight:bold'.format(STATE_COLOURS[state] ?? 'inherit') },
			[ STATES[state] ?? state ]));
}

// Each backend with its health: the kernel's view (buckets included) when the table holds the
// forward, else the daemon's plan (its health checks' `down` list).
function backendsCell(outcome, kernel) {
	let items;

	if (kernel?.backends)
		items = kernel.backends.map((b) => ({
			addr: b.target.addr,
			port: b.target.port,
			health: b.health,
			buckets: b.buckets
		}));
	else
		items = (outcome?.backends ?? []).map((b) => ({
			addr: b.addr,
			port: b.port,
			health: (outcome.down ?? []).indexOf(b.addr) >= 0 ? 'down' : 'serving'
		}));

	// Buckets: of the forward's hash buckets, how many send new flows to this backend.
	const buckets = items.reduce((sum, b) => sum + (b.buckets ?? 0), 0);
	const nodes = items.map((b) => {
		const down = String(b.health).indexOf('down') == 0;
		const label = [ endpoint(b.addr, b.port) ];

		if (down)
			label.push(' (%s)'.format(b.health));

		if (b.buckets != null)
			label.push(' ' + _('%d/%d buckets').format(b.buckets, buckets));

		return E('span', {
			'class': 'kpf-backend',
			'data-health': down ? 'down' : 'serving',
			'data-buckets': b.buckets ?? null,
			'style': 'display:block' + (down ? ';color:%s'.format(STATE_COLOURS.conflict) : '')
		}, label);
	});

	if (outcome?.probe)
		nodes.push(E('small', {}, [ _('checked by %s:%d').format(outcome.probe.kind, outcome.probe.port) ]));

	return E('td', { 'class': 'td kpf-backends', 'data-title': _('Backends') }, nodes.length ? nodes : dash());
}

function countersCell(kernel) {
	const text = (kernel?.packets != null)
		? _('%d packets, %s').format(kernel.packets, '%1024.2mB'.format(kernel.bytes ?? 0))
		: null;

	return E('td', { 'class': 'td kpf-counters', 'data-title': _('Traffic') }, [ text ?? dash() ]);
}

function portCell(key, entry) {
	return E('td', { 'class': 'td kpf-port', 'data-title': _('External port') }, key
		? [ E('strong', {}, [ '%d/%s'.format(key.external_port, key.protocol) ]), ' ',
			E('small', {}, key.family == 'ipv6' ? 'IPv6' : 'IPv4') ]
		: E('em', {}, [ _('entry “%s”').format(entry) ]));
}

function row(state, key, service, cells) {
	return E('tr', {
		'class': 'tr kpf-row',
		'data-state': state,
		'data-key': keyText(key),
		'data-service': service
	}, cells);
}

function serviceRow(o, kernel) {
	const service = '%s/%s'.format(o.namespace, o.name);
	let reason = o.reason ?? '';

	if (o.winner && reason.indexOf(o.winner) < 0)
		reason += (reason ? '; ' : '') + _('held by %s').format(o.winner);

	return row(o.state, o.key, service, [
		portCell(o.key, o.entry),
		stateCell(o.state),
		E('td', { 'class': 'td kpf-reason', 'data-title': _('Reason') }, [ reason || dash() ]),
		E('td', { 'class': 'td kpf-service', 'data-title': _('Service') }, [
			E('strong', {}, [ service ]), E('br'),
			E('small', {}, [ o.service_port ? _('port %s (entry “%s”)').format(o.service_port, o.entry) : _('entry “%s”').format(o.entry) ])
		]),
		backendsCell(o, kernel),
		countersCell(kernel),
		E('td', { 'class': 'td kpf-upstream', 'data-title': _('Upstream') }, [ mappingText(kernel?.upstream) ]),
		E('td', { 'class': 'td kpf-dns', 'data-title': _('DNS target') }, [ o.dns_target ?? dash() ])
	]);
}

function kernelRow(f) {
	return row('kernel', f, f.owner ?? '', [
		portCell(f, ''),
		stateCell('kernel'),
		E('td', { 'class': 'td kpf-reason', 'data-title': _('Reason') },
			_('In the kernel table, but no Service the daemon knows asks for it')),
		E('td', { 'class': 'td kpf-service', 'data-title': _('Service') }, [ f.owner ?? dash() ]),
		backendsCell(null, f),
		countersCell(f),
		E('td', { 'class': 'td kpf-upstream', 'data-title': _('Upstream') }, [ mappingText(f.upstream) ]),
		E('td', { 'class': 'td kpf-dns', 'data-title': _('DNS target') }, dash())
	]);
}

// Every Service entry, the forwarding ones with what the kernel holds for their key, then the
// kernel's forwards that no forwarding entry explains.
function rows(st) {
	const kernel = {};
	const claimed = {};
	const out = [];

	for (let f of st.forwards ?? [])
		kernel[keyText(f)] = f;

	for (let o of st.services ?? []) {
		const k = keyText(o.key);
		const held = (o.state == 'forwarding' && o.key) ? kernel[k] : null;

		if (held)
			claimed[k] = true;

		out.push(serviceRow(o, held));
	}

	for (let f of st.forwards ?? [])
		if (!claimed[keyText(f)])
			out.push(kernelRow(f));

	return out;
}

function emptyNode() {
	const example = [
		'apiVersion: v1',
		'kind: Service',
		'metadata:',
		'  name: web',
		'  annotations:',
		'    kube-port-forward-controller/mapping: "http, 8443:https"',
		'spec:',
		'  type: LoadBalancer',
		'  ports:',
		'    - { name: http, port: 80 }',
		'    - { name: https, port: 443 }'
	].join('\n');

	return E('div', { 'id': 'kpf-empty', 'class': 'cbi-section' }, [
		E('p', {}, _('No forwards yet. The router forwards a WAN port to a Service of type LoadBalancer once the Service is annotated for it: each entry is a Service port (its name or number, forwarded on the same external port) or EXTERNAL:SERVICEPORT.')),
		E('pre', {}, [ example ]),
		E('p', {}, [ _('Or annotate an existing Service:'), ' ',
			E('code', {}, 'kubectl annotate service web kube-port-forward-controller/mapping="http, 8443:https"') ])
	]);
}

function notices(st) {
	const out = [];
	const kc = st.kubeconfig;

	if (st.error)
		out.push(E('div', { 'class': 'alert-message warning', 'id': 'kpf-error' }, [
			E('strong', {}, _('kube-port-forward status failed:')), ' ', st.error ]));

	if (kc && !kc.present)
		out.push(E('div', { 'class': 'alert-message warning', 'id': 'kpf-kubeconfig-missing' }, [
			_('There is no kubeconfig at %s, so the daemon cannot reach the cluster.').format(kc.path), ' ',
			E('a', { 'href': L.url('admin/services/kube-port-forward/settings') }, _('Upload one in Settings')),
			' ', _('(deploy/mint-kubeconfig.sh makes one).')
		]));

	if (st.shape_problem)
		out.push(E('div', { 'class': 'alert-message warning' },
			[ _('The kernel table is not of the expected shape (%s); the daemon rebuilds it.').format(st.shape_problem) ]));

	return out;
}

function headerRow(title, node) {
	return E('tr', { 'class': 'tr' }, [
		E('td', { 'class': 'td left', 'width': '25%' }, title),
		E('td', { 'class': 'td left' }, node)
	]);
}

function header(st) {
	const wan = (st.wan_addresses ?? []).length
		? st.wan_addresses.join(', ')
		: (st.present ? _('any address of the router') : _('none: the table is not there'));
	const devices = (st.wan_interfaces ?? []).length ? ' (%s)'.format(st.wan_interfaces.join(', ')) : '';
	const lastSync = st.daemon?.running ? ago(st.now, st.daemon.last_sync) : _('– (the daemon is not running)');

	return E('table', { 'class': 'table' }, [
		headerRow(_('Daemon'), daemonNode(st)),
		headerRow(_('WAN addresses'), E('span', { 'id': 'kpf-wan' }, [ wan + devices ])),
		headerRow(_('Upstream router'), E('span', { 'id': 'kpf-upstream' }, [ upstreamText(st.upstream) ])),
		headerRow(_('Table last in step'), E('span', { 'id': 'kpf-last-sync' }, [ lastSync ]))
	]);
}

function forwardsTable(list) {
	return E('table', { 'class': 'table', 'id': 'kpf-forwards' }, [
		E('tr', { 'class': 'tr table-titles' }, [
			E('th', { 'class': 'th' }, _('External port')),
			E('th', { 'class': 'th' }, _('State')),
			E('th', { 'class': 'th' }, _('Reason')),
			E('th', { 'class': 'th' }, _('Service')),
			E('th', { 'class': 'th' }, _('Backends')),
			E('th', { 'class': 'th' }, _('Traffic')),
			E('th', { 'class': 'th' }, _('Upstream')),
			E('th', { 'class': 'th' }, _('DNS target'))
		]),
		...list
	]);
}

return view.extend({
	load() {
		return this.fetch();
	},

	fetch() {
		return callStatus().catch((e) => ({ error: e.message }));
	},

	body(st) {
		const list = rows(st);

		return [
			...notices(st),
			header(st),
			E('h3', {}, _('Forwards')),
			list.length ? forwardsTable(list) : emptyNode()
		];
	},

	render(st) {
		const body = E('div', { 'id': 'kpf-status' }, this.body(st));

		poll.add(() => this.fetch().then((next) => dom.content(body, this.body(next))), 5);

		return E('div', { 'class': 'cbi-map' }, [
			E('h2', {}, _('Kubernetes Forwards')),
			E('div', { 'class': 'cbi-map-descr' },
				_('WAN ports this router forwards to Kubernetes LoadBalancer Services, and the annotated Services it does not forward, with why. Refreshes every 5 seconds.')),
			body
		]);
	},

	handleSave: null,
	handleSaveApply: null,
	handleReset: null
});
