'use strict';
'require view';
'require form';
'require rpc';
'require uci';
'require ui';
'require tools.widgets as widgets';

const CONFIG = 'kube-port-forward';
const SECTION = 'main';

const callStatus = rpc.declare({
	object: 'kube-port-forward',
	method: 'status'
});

const callValidate = rpc.declare({
	object: 'kube-port-forward',
	method: 'validate',
	params: [ 'values' ]
});

const callSetKubeconfig = rpc.declare({
	object: 'kube-port-forward',
	method: 'set_kubeconfig',
	params: [ 'content', 'context' ]
});

// Every option of /etc/config/kube-port-forward: what `validate` is given.
const OPTIONS = [
	'enabled', 'kubeconfig', 'context', 'namespace', 'selector',
	'wan_network', 'wan_device', 'wan_address', 'reflection', 'ct_mark', 'health',
	'allow_namespace', 'allow_namespace_selector', 'allow_ports', 'allow_target',
	'allow_external_ips', 'node_ports', 'policy_file',
	'finalizer', 'instance', 'cleanup_deadline', 'resync',
	'check_interval', 'check_timeout', 'check_fall', 'check_rise', 'check_concurrency',
	'upstream', 'upstream_url', 'upstream_lease', 'upstream_poll', 'dns_targets', 'verbose'
];

function kubeconfigText(kc) {
	if (!kc)
		return _('unknown (the status call failed)');

	if (!kc.present)
		return _('missing: no file at %s').format(kc.path);

	return _('present at %s, written %s').format(kc.path,
		kc.mtime ? new Date(kc.mtime * 1000).toLocaleString() : _('at an unknown time'));
}

function flag(s, tab, name, title, description, dflt) {
	const o = s.taboption(tab, form.Flag, name, title, description);
	o.default = dflt;
	o.rmempty = false;
	return o;
}

return view.extend({
	load() {
		return Promise.all([
			callStatus().catch(() => ({})),
			uci.load(CONFIG)
		]);
	},

	kubeconfigWidget(kubeconfig) {
		return E('div', {}, [
			E('input', { 'type': 'file', 'id': 'kpf-kubeconfig-file' }),
			' ',
			E('button', {
				'class': 'cbi-button cbi-button-action',
				'id': 'kpf-kubeconfig-upload',
				'click': ui.createHandlerFn(this, 'handleUpload')
			}, _('Upload')),
			E('div', { 'id': 'kpf-kubeconfig-state' }, [ kubeconfigText(kubeconfig) ])
		]);
	},

	handleUpload() {
		const input = document.getElementById('kpf-kubeconfig-file');
		const file = input.files[0];

		if (!file) {
			ui.addNotification(null, E('p', {}, _('Choose a kubeconfig file first.')), 'warning');
			return Promise.resolve();
		}

		// Checked with the context the form holds now, so a kubeconfig of another cluster can
		// come in with its own context before both are saved.
		const context = this.map.lookupOption('context', SECTION)?.[0]?.formvalue(SECTION) ?? '';

		return file.text()
			.then((content) => callSetKubeconfig(content, context))
			.then((res) => {
				if (res.ok) {
					input.value = '';
					ui.addTimeLimitedNotification(null, E('p', {}, _('The kubeconfig is stored (mode 0600).')), 5000, 'info');
				}
				else {
					ui.addNotification(_('The kubeconfig was not stored'), E('p', {}, [ res.message ]), 'danger');
				}

				return callStatus();
			})
			.then((st) => {
				document.getElementById('kpf-kubeconfig-state').textContent = kubeconfigText(st.kubeconfig);
			})
			.catch((e) => ui.addNotification(null, E('p', {}, [ e.message ]), 'danger'));
	},

	render([ status ]) {
		const m = new form.Map(CONFIG, _('Kubernetes Forwards'),
			_('Forwards WAN ports to Kubernetes LoadBalancer Services annotated with kube-port-forward-controller/mapping. The daemon checks these settings before they are saved.'));
		const s = m.section(form.NamedSection, SECTION, 'kube-port-forward');
		let o;

		s.anonymous = true;
		s.addremove = false;

		s.tab('general', _('General'));
		s.tab('wan', _('WAN'));
		s.tab('policy', _('Policy'));
		s.tab('upstream', _('Upstream and DNS'));
		s.tab('checks', _('Health checks'));
		s.tab('advanced', _('Advanced'));

		flag(s, 'general', 'enabled', _('Enabled'), _('Start the daemon.'), '0');

		o = s.taboption('general', form.DummyValue, '_kubeconfig_upload', _('Kubeconfig'),
			_('The kubeconfig with this router\'s ServiceAccount token (deploy/mint-kubeconfig.sh makes one). The daemon checks it before it is stored; it is stored readable by root only and never shown here.'));
		o.renderWidget = () => this.kubeconfigWidget(status.kubeconfig);

		s.taboption('general', form.Value, 'context', _('Context'),
			_('kubeconfig context to use; empty: its current context.'));

		s.taboption('general', form.DynamicList, 'namespace', _('Watched namespaces'),
			_('Watch only these namespaces; none: all namespaces.'));

		s.taboption('general', form.Value, 'selector', _('Service selector'),
			_('Watch only Services with these labels (label selector, e.g. expose=internet).'));

		o = s.taboption('wan', widgets.NetworkSelect, 'wan_network', _('WAN networks'),
			_('Logical networks whose devices\' addresses are forwarded from; the daemon follows their addresses.'));
		o.multiple = true;

		o = s.taboption('wan', widgets.DeviceSelect, 'wan_device', _('WAN devices'),
			_('Devices by kernel name, in addition to the networks above (e.g. pppoe-wan).'));
		o.multiple = true;
		o.noaliases = true;

		o = s.taboption('wan', form.DynamicList, 'wan_address', _('WAN addresses'),
			_('Fixed public addresses to forward too, e.g. a 1:1 NAT address not on any interface.'));
		o.datatype = 'ipaddr';

		flag(s, 'wan', 'reflection', _('NAT reflection'),
			_('LAN clients reach forwards through the WAN address too.'), '1');

		s.taboption('policy', form.DynamicList, 'allow_namespace', _('Allowed namespaces'),
			_('Namespaces whose Services may open ports; none: any.'));

		s.taboption('policy', form.Value, 'allow_namespace_selector', _('Allowed namespace selector'),
			_('Only namespaces with these labels may forward (needs namespaces list/watch RBAC).'));

		s.taboption('policy', form.DynamicList, 'allow_ports', _('Allowed external ports'),
			_('Ports or ranges like 8000-8999; none: any port the router itself does not serve on its WAN side (name a port here to forward it anyway).'));

		s.taboption('policy', form.DynamicList, 'allow_target', _('Allowed target networks'),
			_('Networks forwards may point at; none: the private ranges only.'));

		flag(s, 'policy', 'allow_external_ips', _('Forward to externalIPs'),
			_('Also forward to spec.externalIPs when a Service has no LoadBalancer address. Off by default: anyone who may create a Service can write any address there.'), '0');

		o = s.taboption('policy', form.ListValue, 'node_ports', _('Node ports'),
			_('Services without a LoadBalancer address go to their node ports on the Ready nodes (needs nodes list/watch RBAC).'));
		o.value('off', _('off'));
		o.value('annotated', _('annotated (kube-port-forward-controller/target: nodeports)'));
		o.value('all', _('all'));
		o.default = 'off';

		o = s.taboption('policy', form.Value, 'policy_file', _('Policy file'),
			_('A YAML policy file instead of the options above, which are then ignored; re-read on reload.'));
		o.placeholder = '/etc/kube-port-forward/policy.yaml';

		o = s.taboption('upstream', form.ListValue, 'upstream', _('Upstream router'),
			_('Behind another router (double NAT): UPnP maps every IPv4 TCP and UDP forward on its IGD too.'));
		o.value('off', _('off'));
		o.value('upnp', _('UPnP IGD'));
		o.default = 'off';

		o = s.taboption('upstream', form.Value, 'upstream_url', _('IGD URL'),
			_('The IGD\'s description or control URL; empty: found by SSDP on the WAN.'));
		o.placeholder = 'http://192.168.1.1:5000/rootDesc.xml';

		o = s.taboption('upstream', form.Value, 'upstream_lease', _('Lease'),
			_('Seconds each upstream mapping is leased for, renewed at half time (0: permanent).'));
		o.datatype = 'uinteger';
		o.placeholder = '3600';

		o = s.taboption('upstream', form.Value, 'upstream_poll', _('IGD check interval'),
			_('Seconds between checks that the IGD is there, has not restarted, and of its address.'));
		o.datatype = 'range(1,3600)';
		o.placeholder = '5';

		flag(s, 'upstream', 'dns_targets', _('DNS targets'),
			_('Write the router\'s public address as the external-dns target of every Service forwarded; a Service opts out with kube-port-forward-controller/dns-target: "off".'), '0');

		o = s.taboption('checks', form.Value, 'check_interval', _('Interval'),
			_('Seconds between two probes of a backend.'));
		o.datatype = 'ufloat';
		o.placeholder = '2';

		o = s.taboption('checks', form.Value, 'check_timeout', _('Timeout'),
			_('Seconds a probe may take (less than the interval).'));
		o.datatype = 'ufloat';
		o.placeholder = '1';

		o = s.taboption('checks', form.Value, 'check_fall', _('Fall'),
			_('Failed probes in a row that take a backend out of its forwards.'));
		o.datatype = 'uinteger';
		o.placeholder = '2';

		o = s.taboption('checks', form.Value, 'check_rise', _('Rise'),
			_('Passed probes in a row that bring it back.'));
		o.datatype = 'uinteger';
		o.placeholder = '2';

		o = s.taboption('checks', form.Value, 'check_concurrency', _('Concurrency'),
			_('Probes running at once, at most.'));
		o.datatype = 'uinteger';
		o.placeholder = '64';

		o = s.taboption('advanced', form.Value, 'kubeconfig', _('Kubeconfig path'),
			_('Where the kubeconfig is stored and read.'));
		o.placeholder = '/etc/kube-port-forward/kubeconfig';

		o = s.taboption('advanced', form.Value, 'ct_mark', _('Conntrack mark'),
			_('Mark bit of forwarded flows; firewall4\'s include must match it.'));
		o.placeholder = '0x00200000';

		o = s.taboption('advanced', form.Value, 'health', _('Health endpoint'),
			_('Address:port of /healthz, /readyz and /metrics; keep it on loopback. Empty: off (the status page then cannot tell readiness).'));
		o.placeholder = '127.0.0.1:9477';

		o = s.taboption('advanced', form.Value, 'finalizer', _('Finalizer'),
			_('This router\'s finalizer; a second router on the same cluster needs its own.'));
		o.placeholder = 'kube-port-forward-controller/finalizer';

		s.taboption('advanced', form.Value, 'instance', _('Instance name'),
			_('This router\'s name in events and conditions; empty: the host name.'));

		o = s.taboption('advanced', form.Value, 'cleanup_deadline', _('Cleanup deadline'),
			_('Seconds a failing cleanup may take before a deleted Service is released anyway.'));
		o.datatype = 'uinteger';
		o.placeholder = '300';

		o = s.taboption('advanced', form.Value, 'resync', _('Resync'),
			_('Seconds between full reads of the kernel table.'));
		o.datatype = 'uinteger';
		o.placeholder = '300';

		flag(s, 'advanced', 'verbose', _('Verbose'), _('Debug logging.'), '0');

		this.map = m;

		// The theme's list items have a border of their own, which its invalid class does not
		// reach: a refused item is coloured here.
		return m.render().then((node) => E('div', {}, [
			E('style', {}, '.cbi-dynlist > .item.kpf-refused { border-color: var(--error-color-medium); color: var(--error-color-high); }'),
			node
		]));
	},

	// The options as they would be saved: the form parsed into LuCI's pending UCI changes.
	values() {
		const values = {};

		for (let option of OPTIONS) {
			const value = uci.get(CONFIG, SECTION, option);

			if (value != null)
				values[option] = value;
		}

		return values;
	},

	clearRefusal() {
		document.querySelectorAll('.kpf-refusal').forEach((node) => {
			node.closest('.alert-message')?.remove();
		});
		document.querySelectorAll('.kpf-refused').forEach((node) => {
			node.classList.remove('kpf-refused', 'cbi-input-invalid');
		});
	},

	// The daemon's message in a notification, and its option marked invalid on its tab.
	refuse(res) {
		ui.addNotification(_('The daemon refuses these settings; nothing was saved'),
			E('p', { 'class': 'kpf-refusal' }, [ res.message ]), 'danger');

		const field = res.option ? document.getElementById('cbi-%s-%s-%s'.format(CONFIG, SECTION, res.option)) : null;

		if (!field)
			return;

		// Text fields carry the widget id, checkboxes name it, lists and dropdowns carry the cbid.
		const cbid = 'cbid.%s.%s.%s'.format(CONFIG, SECTION, res.option);
		const widget = field.querySelector('[id="widget.%s"], [data-widget-id="widget.%s"], [id="%s"]'.format(cbid, cbid, cbid));

		// A list is a frame of items, which the theme colours one by one: those the message
		// names are marked, or all of them when it names none.
		const items = widget ? Array.from(widget.querySelectorAll('.item')) : [];
		const named = items.filter((item) => res.message.indexOf(item.querySelector('input[type="hidden"]')?.value || '\0') >= 0);

		if (widget)
			[ widget, ...(named.length ? named : items) ].forEach((node) => {
				node.classList.add('cbi-input-invalid', 'kpf-refused');
				node.addEventListener('change', () => node.classList.remove('cbi-input-invalid', 'kpf-refused'), { once: true });
			});

		const pane = field.closest('[data-tab]');
		const tab = pane?.parentNode.previousElementSibling?.querySelector('[data-tab="%s"] > a'.format(pane.getAttribute('data-tab')));

		tab?.click();
		ui.tabs.updateTabs(null, this.map.root);
	},

	// Saved only once the daemon accepts the whole configuration (`run --check`).
	handleSave(ev) {
		this.clearRefusal();

		return this.map.parse()
			.then(() => callValidate(this.values()))
			.then((res) => {
				if (!res.ok) {
					this.refuse(res);
					return false;
				}

				return this.map.save().then(() => true);
			})
			.catch((e) => {
				ui.addNotification(null, E('p', { 'class': 'kpf-refusal' }, [ e.message ]), 'danger');
				return false;
			});
	},

	handleSaveApply(ev, mode) {
		return this.handleSave(ev).then((saved) => {
			if (saved)
				ui.changes.apply(mode == '0');
		});
	}
});
