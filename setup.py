from setuptools import Extension, find_packages, setup

setup(
    name="zhiva-model-proxy",
    version="0.1.0",
    description="Relay inference requests from a DICOM viewer to AI model APIs via a DICOMweb PACS",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted/plugins has no __init__.py on purpose: it is Twisted's plugin
    # namespace, and zhiva_plugin.py is dropped into it.
    packages=find_packages(include=["zhiva", "zhiva.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["zhiva_plugin.py"]},
    install_requires=[
        "twisted[tls]>=23.10",
        "treq>=23.11",
        "pyOpenSSL>=23.2",
        "service-identity>=23.1",
        "zope.interface>=6.0",
        "pydicom>=3.0",
        # numpy: the vectorised zhiva-json encoder (bytes -> decimal text at
        # hundreds of MB/s); orjson: parsing and checking model results of
        # ~100 MB without stalling a thread for seconds.
        "numpy>=1.24",
        "orjson>=3.9",
        # /metrics in the Prometheus text format.
        "prometheus-client>=0.17",
        # Viewer authentication (--viewer-auth-keys): JWT RS256/ES256
        # verification with exp/iss/aud and leeway, and JWKS key parsing; the
        # [crypto] extra is cryptography, already installed with twisted[tls].
        "PyJWT[crypto]>=2.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.90",
            # parsing docker-compose.yml in the packaging tests.
            "PyYAML>=6",
        ],
        # bench/relay.py: the usual Python DICOMweb client, measured against.
        "bench": ["dicomweb-client>=0.59", "requests>=2.28"],
    },
    entry_points={"console_scripts": ["zhiva = zhiva.cli:main"]},
    # The C fast path of the zhiva-json encoder (~1.9 GB/s against ~0.2 GB/s
    # for numpy on our 2-core machines, GIL released). Optional: without a C
    # compiler the install still succeeds and zhiva.decimal_bytes uses numpy.
    ext_modules=[Extension("_zhiva_decimal", ["zhiva/_decimal.c"], optional=True)],
)
